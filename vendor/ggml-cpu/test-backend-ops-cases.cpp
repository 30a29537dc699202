    // rbee's small-batch CPU flash attention (ggml-cpu/flash-attn-small.cpp):
    // batches of 2-63 query tokens over a cache of 128+ visible cells, the
    // shape of a chat's next turn. Head sizes of real models (K and V apart
    // where llama.cpp allows it), grouped-query attention from 1 to 8 query
    // heads per KV head on 1-8 KV heads, caches not a whole number of tiles,
    // several streams, permuted Q/K/V, and the shapes it hands to the general
    // kernel (one token, 64+, ALiBi, soft-capping, sinks, quantized caches).
    // Case arguments: hsk, hsv, nh, {nr2, nr3}, kv, nb, mask, sinks,
    // max_bias, logit_softcap, prec, type_KV, permute.
    for (int64_t hs : { 64, 80, 96, 128, 256 }) {
        for (int64_t nb : { 2, 7, 18, 63 }) {
            test_cases.emplace_back(new test_flash_attn_ext(hs, hs, 3, {3, 1}, 1536, nb, true, false, 0.0f, 0.0f,
                                                            GGML_PREC_F32, GGML_TYPE_F16));
        }
    }
    test_cases.emplace_back(new test_flash_attn_ext(128, 64, 4, {2, 1}, 512, 9, true, false, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    for (int64_t nh : { 1, 2, 4, 8 }) {
        for (int64_t nr2 : { 1, 2, 4, 8 }) {
            test_cases.emplace_back(new test_flash_attn_ext(128, 128, nh, {nr2, 1}, 384, 6, true, false, 0.0f, 0.0f,
                                                            GGML_PREC_F32, GGML_TYPE_F16));
        }
    }
    // Fewer tiles than threads: the cached cells are split among threads.
    test_cases.emplace_back(new test_flash_attn_ext(256, 256, 1, {8, 1}, 1000, 3, true, false, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 2}, 600, 7, true, false, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, 18, true, false, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16, {0, 2, 1, 3}));
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 700, 18, true, false, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F32));
    // Handed to the general kernel.
    for (int64_t nb : { 1, 64 }) {
        test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, nb, true, false, 0.0f, 0.0f,
                                                        GGML_PREC_F32, GGML_TYPE_F16));
    }
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, 18, true, false, 8.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, 18, true, false, 0.0f, 30.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, 18, true, true, 0.0f, 0.0f,
                                                    GGML_PREC_F32, GGML_TYPE_F16));
    for (ggml_type type_KV : { GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_BF16 }) {
        test_cases.emplace_back(new test_flash_attn_ext(64, 64, 3, {3, 1}, 1536, 18, true, false, 0.0f, 0.0f,
                                                        GGML_PREC_F32, type_KV));
    }
