/* A flat C face over libllama for sparsedeploy's `llamacpp` engine (sparsedeploy/engine/llamacpp.py).
 *
 * llama.h passes its parameter structs by value and changes their fields between versions; ctypes would
 * have to mirror every field exactly. This shim is compiled against the very llama.h it links with (by
 * scripts/build-llamacpp.sh), so Python only sees ints, pointers and float buffers.
 *
 *   h = sdl_open(path, n_ctx, n_threads, kv_f32)   NULL on failure
 *   sdl_n_vocab(h)
 *   sdl_reset(h)                                   empty the KV cache (a new sequence)
 *   sdl_feed(h, tokens, n, pos, logits_out)        decode n tokens at positions pos.., copy the last
 *                                                  token's logits into logits_out; 0 = ok
 *   sdl_close(h)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

typedef struct {
    struct llama_model *model;
    struct llama_context *ctx;
    struct llama_batch batch;
    int n_vocab;
    int n_ctx;
} sdl_t;

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

void sdl_verbose(int on) { llama_log_set(on ? NULL : quiet_log, NULL); }

void *sdl_open(const char *path, int n_ctx, int n_threads, int kv_f32) {
    static int inited = 0;
    if (!inited) { llama_backend_init(); inited = 1; }
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model) return NULL;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = (uint32_t)n_ctx;
    cp.n_ubatch = (uint32_t)n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.no_perf = true;
    if (kv_f32) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { llama_model_free(model); return NULL; }
    sdl_t *h = calloc(1, sizeof(sdl_t));
    h->model = model;
    h->ctx = ctx;
    h->n_ctx = n_ctx;
    h->n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    h->batch = llama_batch_init(n_ctx, 0, 1);
    return h;
}

int sdl_n_vocab(void *p) { return ((sdl_t *)p)->n_vocab; }

void sdl_reset(void *p) { llama_memory_clear(llama_get_memory(((sdl_t *)p)->ctx), true); }

int sdl_feed(void *p, const int32_t *tokens, int n, int pos, float *logits_out) {
    sdl_t *h = (sdl_t *)p;
    if (n < 1 || n > h->n_ctx || pos + n > h->n_ctx) return -100;
    for (int i = 0; i < n; i++) {
        h->batch.token[i] = tokens[i];
        h->batch.pos[i] = pos + i;
        h->batch.n_seq_id[i] = 1;
        h->batch.seq_id[i][0] = 0;
        h->batch.logits[i] = (i == n - 1);
    }
    h->batch.n_tokens = n;
    int rc = llama_decode(h->ctx, h->batch);
    if (rc != 0) return rc;
    const float *logits = llama_get_logits_ith(h->ctx, -1);
    if (!logits) return -101;
    memcpy(logits_out, logits, sizeof(float) * (size_t)h->n_vocab);
    return 0;
}

void sdl_close(void *p) {
    sdl_t *h = (sdl_t *)p;
    if (!h) return;
    llama_batch_free(h->batch);
    llama_free(h->ctx);
    llama_model_free(h->model);
    free(h);
}
