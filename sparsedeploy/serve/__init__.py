"""HTTP serving of one deployment: `sparsedeploy serve` (see app.py)."""
