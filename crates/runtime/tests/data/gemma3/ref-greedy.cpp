// ref-greedy: reference greedy decoding with libllama.
//
// usage: ref-greedy -m MODEL (-p PROMPT | -f FILE) [-o LOGITS0.f32] [-n 32] [-c 512] [--no-fa] [--f32-kv]
//
// - tokenizes PROMPT with llama_tokenize(add_special = true, parse_special = true);
//   add_special=true adds BOS iff llama_vocab_get_add_bos(vocab) (and EOS iff add_eos)
// - context: n_ctx 512, n_batch 512, n_ubatch 512, 2 threads (gen and batch), other params default
// - decodes the prompt in batches of at most 512 tokens, as llama.cpp's tools cut it (only the last position
//   outputs logits)
// - runs N greedy steps: argmax over logits, ties -> lower id; never stops at EOG
// - prints prompt ids, greedy ids, min top1-top2 logit gap over the N steps,
//   top-10 (id:logit) of step 0 (sorted by logit desc, ties by id asc)
// - writes the full step-0 logits (n_vocab f32, little-endian/native) to LOGITS0.f32
#include "llama.h"

#include <algorithm>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path, prompt, out_path;
    int n_steps = 32;
    int n_ctx = 512;
    bool f32_kv = false; // sensitivity check only; references use the default F16 KV cache
    bool no_fa = false;  // sensitivity check only; references use the default (flash_attn auto -> enabled on CPU)
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-p") && i + 1 < argc) prompt = argv[++i];
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) n_steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) n_ctx = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-f") && i + 1 < argc) {
            FILE * f = fopen(argv[++i], "rb");
            if (!f) { fprintf(stderr, "cannot open %s\n", argv[i]); return 1; }
            char buf[4096]; size_t n;
            while ((n = fread(buf, 1, sizeof(buf), f)) > 0) prompt.append(buf, n);
            fclose(f);
        }
        else if (!strcmp(argv[i], "--no-fa")) no_fa = true;
        else if (!strcmp(argv[i], "--f32-kv")) f32_kv = true;
        else { fprintf(stderr, "usage: %s -m MODEL -p PROMPT [-o LOGITS0.f32] [-n 32] [--no-fa] [--f32-kv]\n", argv[0]); return 1; }
    }
    if (model_path.empty()) { fprintf(stderr, "missing -m\n"); return 1; }

    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (!model) { fprintf(stderr, "failed to load model\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    fprintf(stderr, "ref-greedy: add_bos=%d add_eos=%d bos=%d eos=%d eot=%d n_vocab=%d\n",
            (int) llama_vocab_get_add_bos(vocab), (int) llama_vocab_get_add_eos(vocab),
            llama_vocab_bos(vocab), llama_vocab_eos(vocab), llama_vocab_eot(vocab), n_vocab);

    // tokenize exactly as llama.cpp tools do: add_special (BOS per metadata), parse_special
    const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), NULL, 0, true, true);
    std::vector<llama_token> toks(n_prompt);
    if (llama_tokenize(vocab, prompt.c_str(), prompt.size(), toks.data(), toks.size(), true, true) < 0) {
        fprintf(stderr, "tokenize failed\n"); return 1;
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_ctx;
    cparams.n_batch = 512;
    cparams.n_ubatch = 512;
    cparams.n_threads = 2;
    cparams.n_threads_batch = 2;
    if (no_fa) cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (f32_kv) { cparams.type_k = GGML_TYPE_F32; cparams.type_v = GGML_TYPE_F32; }
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    std::vector<llama_token> out;
    float min_gap = 1e30f;
    int min_gap_step = 0;
    std::vector<std::pair<int, float>> top10;

    // prompt as one batch; llama_batch_get_one -> logits only for the last token
    for (size_t at = 0; at < toks.size(); at += 512) {
        const int n = (int) std::min<size_t>(512, toks.size() - at);
        if (llama_decode(ctx, llama_batch_get_one(toks.data() + at, n))) {
            fprintf(stderr, "decode failed (prompt)\n"); return 1;
        }
    }
    for (int step = 0; step < n_steps; step++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int i = 1; i < n_vocab; i++) if (logits[i] > logits[best]) best = i;  // ties -> lower id
        float second = -INFINITY;
        for (int i = 0; i < n_vocab; i++) if (i != best && logits[i] > second) second = logits[i];
        if (logits[best] - second < min_gap) { min_gap = logits[best] - second; min_gap_step = step; }
        if (step == 0) {
            std::vector<int> idx(n_vocab);
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + 10, idx.end(), [&](int a, int b) {
                return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            });
            for (int k = 0; k < 10; k++) top10.push_back({idx[k], logits[idx[k]]});
            if (!out_path.empty()) {
                FILE * f = fopen(out_path.c_str(), "wb");
                if (!f || fwrite(logits, sizeof(float), n_vocab, f) != (size_t) n_vocab) {
                    fprintf(stderr, "failed to write %s\n", out_path.c_str()); return 1;
                }
                fclose(f);
            }
        }
        out.push_back(best);
        if (step + 1 < n_steps) {
            llama_token t = best;
            if (llama_decode(ctx, llama_batch_get_one(&t, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
        }
    }

    printf("prompt_ids:");
    for (auto t : toks) printf(" %d", t);
    printf("\ngreedy_ids:");
    for (auto t : out) printf(" %d", t);
    printf("\nmin_gap: %.6f at step %d\ntop10:", min_gap, min_gap_step);
    for (auto & p : top10) printf(" %d:%.6f", p.first, p.second);
    printf("\ngreedy_text: ");
    for (auto t : out) {
        char buf[256];
        int n = llama_token_to_piece(vocab, t, buf, sizeof(buf), 0, true);
        if (n > 0) fwrite(buf, 1, n, stdout);
    }
    printf("\n");

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
