// The boundary between rbee and the llama.cpp calls that can throw.
//
// A C++ exception that unwinds into Rust aborts the process ("Rust cannot
// catch foreign exceptions"): one request with a regex llama.cpp cannot
// match would take down the worker and every answer on its other slots.
// Each function here makes one such call inside try/catch and turns what was
// thrown into a status and a message; `guard.rs` declares them and is the
// only caller. Built by rbee's build.rs against the llama.cpp tree that
// llama-cpp-sys-2 compiled, and linked with its libraries.

#include "llama.h"

#include "json-schema-to-grammar.h"
#include "json.h"
#include "llama-grammar.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Copies `what` into `err` (at most `cap` bytes with the NUL).
void say(char * err, size_t cap, const char * what) {
    if (err == nullptr || cap == 0) {
        return;
    }
    std::strncpy(err, what, cap - 1);
    err[cap - 1] = '\0';
}

// llama.cpp's own `parse_space(src, true)`: blanks, newlines and `#` comments.
const char * skip_space(const char * pos) {
    while (*pos == ' ' || *pos == '\t' || *pos == '\r' || *pos == '\n' || *pos == '#') {
        if (*pos == '#') {
            while (*pos != '\0' && *pos != '\r' && *pos != '\n') {
                pos++;
            }
        } else {
            pos++;
        }
    }
    return pos;
}

}  // namespace

// Runs `body`; what it throws becomes -1 and a message in `err`.
template <typename F> int guarded(char * err, size_t cap, F && body) {
    try {
        body();
        return 0;
    } catch (const std::bad_alloc &) {
        say(err, cap, "out of memory");
    } catch (const std::exception & e) {
        say(err, cap, e.what());
    } catch (...) {
        say(err, cap, "an exception that is not a std::exception");
    }
    return -1;
}

extern "C" {

// llama_sampler_sample, with the grammar (when there is one) applied first
// on its own: when it allows no token at all, llama.cpp would hand the
// chain nothing but -inf and then abort (an end-of-generation token the
// grammar refuses) or throw (any other); here that is an error instead.
int rbee_sample(llama_sampler * grammar, llama_sampler * chain, llama_context * ctx, int32_t idx,
                llama_token * out, char * err, size_t cap) {
    return guarded(err, cap, [&] {
        const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
        const int32_t n_vocab = llama_vocab_n_tokens(vocab);
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (logits == nullptr) {
            throw std::runtime_error("no logits at this batch position");
        }
        // One buffer per thread (the engine's), as llama.cpp keeps one per chain.
        static thread_local std::vector<llama_token_data> cur;
        cur.resize(n_vocab);
        for (llama_token id = 0; id < n_vocab; id++) {
            cur[id] = llama_token_data{id, logits[id], 0.0f};
        }
        llama_token_data_array cur_p = {cur.data(), cur.size(), -1, false};
        if (grammar != nullptr) {
            llama_sampler_apply(grammar, &cur_p);
            bool any = false;
            for (size_t i = 0; i < cur_p.size && !any; i++) {
                any = cur_p.data[i].logit != -INFINITY;
            }
            if (!any) {
                throw std::runtime_error("the grammar allows no token this model can write next");
            }
        }
        llama_sampler_apply(chain, &cur_p);
        if (cur_p.selected < 0 || cur_p.selected >= (int64_t) cur_p.size) {
            throw std::runtime_error("the samplers chose no token");
        }
        const llama_token token = cur_p.data[cur_p.selected].id;
        if (grammar != nullptr) {
            llama_sampler_accept(grammar, token);
        }
        llama_sampler_accept(chain, token);
        *out = token;
    });
}

// llama_decode: what it throws (an allocation that fails under the worker's
// memory limit, say) becomes an error for the batch's requests.
int rbee_decode(llama_context * ctx, llama_batch batch, int32_t * ret, char * err, size_t cap) {
    return guarded(err, cap, [&] { *ret = llama_decode(ctx, batch); });
}

// llama_sampler_accept: the same, for a token fed in (a failover's resumed answer).
int rbee_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t cap) {
    return guarded(err, cap, [&] { llama_sampler_accept(smpl, token); });
}

// llama_tokenize; `*n` as llama_tokenize returns it (negative: the room needed).
int rbee_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                  llama_token * tokens, int32_t n_tokens_max, bool add_special,
                  bool parse_special, int32_t * n, char * err, size_t cap) {
    return guarded(err, cap, [&] {
        *n = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special);
    });
}

// common's JSON-schema converter; the grammar in `*out` (free with rbee_free).
int rbee_json_schema_to_grammar(const char * schema, char ** out, char * err, size_t cap) {
    return guarded(err, cap, [&] {
        const auto parsed = common_json::parse(schema);
        const std::string grammar = json_schema_to_grammar(parsed);
        *out = static_cast<char *>(std::malloc(grammar.size() + 1));
        if (*out == nullptr) {
            throw std::bad_alloc();
        }
        std::memcpy(*out, grammar.c_str(), grammar.size() + 1);
    });
}

void rbee_free(char * p) {
    std::free(p);
}

// Parses a GBNF grammar as llama_sampler_init_grammar will, but says why it
// does not parse (llama.cpp prints that to stderr and returns nothing).
int rbee_grammar_check(const char * src, char * err, size_t cap) {
    return guarded(err, cap, [&] {
        llama_grammar_parser parser;
        const char * pos = skip_space(src);
        while (*pos != '\0') {
            pos = parser.parse_rule(pos);
        }
        for (const auto & rule : parser.rules) {
            if (rule.empty()) {
                throw std::runtime_error("a rule is used but never defined");
            }
            for (const auto & elem : rule) {
                if (elem.type != LLAMA_GRETYPE_RULE_REF) {
                    continue;
                }
                if (elem.value < parser.rules.size() && !parser.rules[elem.value].empty()) {
                    continue;
                }
                for (const auto & kv : parser.symbol_ids) {
                    if (kv.second == elem.value) {
                        throw std::runtime_error("rule '" + kv.first + "' is used but never defined");
                    }
                }
            }
        }
        if (parser.symbol_ids.find("root") == parser.symbol_ids.end()) {
            throw std::runtime_error("there is no rule named root");
        }
    });
}

}  // extern "C"
