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

#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

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

#define RBEE_GUARDED(body)                                    \
    try {                                                     \
        body;                                                 \
        return 0;                                             \
    } catch (const std::bad_alloc &) {                        \
        say(err, cap, "out of memory");                       \
        return -1;                                            \
    } catch (const std::exception & e) {                      \
        say(err, cap, e.what());                              \
        return -1;                                            \
    } catch (...) {                                           \
        say(err, cap, "an exception that is not a std::exception"); \
        return -1;                                            \
    }

extern "C" {

// llama_sampler_sample: a grammar sampler throws when no token can continue it.
int rbee_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx, llama_token * out,
                        char * err, size_t cap) {
    RBEE_GUARDED(*out = llama_sampler_sample(smpl, ctx, idx))
}

// llama_sampler_accept: the same, for a token fed in (a failover's resumed answer).
int rbee_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t cap) {
    RBEE_GUARDED(llama_sampler_accept(smpl, token))
}

// llama_tokenize; `*n` as llama_tokenize returns it (negative: the room needed).
int rbee_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                  llama_token * tokens, int32_t n_tokens_max, bool add_special,
                  bool parse_special, int32_t * n, char * err, size_t cap) {
    RBEE_GUARDED(*n = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special,
                                     parse_special))
}

// common's JSON-schema converter; the grammar in `*out` (free with rbee_free).
int rbee_json_schema_to_grammar(const char * schema, char ** out, char * err, size_t cap) {
    RBEE_GUARDED({
        const auto parsed = common_json::parse(schema);
        const std::string grammar = json_schema_to_grammar(parsed);
        *out = static_cast<char *>(std::malloc(grammar.size() + 1));
        if (*out == nullptr) {
            throw std::bad_alloc();
        }
        std::memcpy(*out, grammar.c_str(), grammar.size() + 1);
    })
}

void rbee_free(char * p) {
    std::free(p);
}

// Parses a GBNF grammar as llama_sampler_init_grammar will, but says why it
// does not parse (llama.cpp prints that to stderr and returns nothing).
int rbee_grammar_check(const char * src, char * err, size_t cap) {
    RBEE_GUARDED({
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
    })
}

}  // extern "C"
