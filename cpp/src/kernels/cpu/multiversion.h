// FQ_MULTIVERSION: compile a plain loop for AVX-512 (x86-64-v4), AVX2 (v3) and baseline x86-64 and
// pick the best at run time, so the portable code paths (reference kernels, norms, attention) are
// vectorized on every machine without -march=native.
#pragma once

// Not under ASan or TSan: their instrumented ifunc resolvers run before the runtime is set up (the
// TSan build crashed at startup in attention_values_ref's resolver).
// (clang 14 says so through __has_feature only; it also refuses clones of templates: the fuzz build.)
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define FQ_SANITIZED_BUILD 1
#endif
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__) && !defined(FQ_SANITIZED_BUILD)
#define FQ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FQ_MULTIVERSION
#endif
