/* meo C API example: greedy (or sampled) generation from prompt token ids.
 *
 *   gcc -O2 -I runtime/ffi/include examples/c/main.c libmeo_ffi.a -lpthread -lm -ldl -o meo-c
 *   ./meo-c MODEL.meo MAX_NEW_TOKENS 1,2,3
 *
 * Prints the generated ids space-separated on one line, like `meo run MODEL --tokens 1,2,3
 * --max-new-tokens N`; the streamed text (if the model has a tokenizer) and stats go to
 * stderr. Exit status 0 on success, 1 on any error (the message is printed).
 */
#include "meo.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, MeoStatus s) {
  fprintf(stderr, "meo-c: %s failed: %s: %s\n", what, meo_status_string(s), meo_last_error());
  return 1;
}

/* Streams each generated piece of text to stderr; returning 0 continues. */
static int32_t on_token(void *user_data, uint32_t token, const char *text, size_t text_len) {
  (void)token;
  size_t *pieces = (size_t *)user_data;
  if (text_len > 0) {
    fwrite(text, 1, text_len, stderr);
    *pieces += 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s MODEL.meo MAX_NEW_TOKENS ID,ID,...\n", argv[0]);
    return 2;
  }
  size_t max_new = (size_t)strtoul(argv[2], NULL, 10);
  uint32_t prompt[4096];
  size_t n_prompt = 0;
  for (char *p = argv[3]; *p && n_prompt < 4096;) {
    char *end;
    prompt[n_prompt++] = (uint32_t)strtoul(p, &end, 10);
    if (end == p) {
      fprintf(stderr, "meo-c: bad token list %s\n", argv[3]);
      return 2;
    }
    p = *end == ',' ? end + 1 : end;
  }

  MeoModel *model = NULL;
  MeoStatus s = meo_model_open(argv[1], &model);
  if (s != MEO_STATUS_OK) return fail("meo_model_open", s);

  MeoModelInfo info;
  if ((s = meo_model_info(model, &info)) != MEO_STATUS_OK) return fail("meo_model_info", s);
  fprintf(stderr, "meo %s: vocab %u, %u layers, %u experts (top-%u)\n", meo_version(), info.vocab_size,
          info.num_layers, info.num_experts, info.top_k);

  MeoSessionOptions opts = {0}; /* threads 0: one per core; max_context 0: 4096 positions */
  MeoSession *session = NULL;
  if ((s = meo_session_new(model, &opts, &session)) != MEO_STATUS_OK) return fail("meo_session_new", s);
  /* The session keeps the model alive: the caller's reference can go now. */
  meo_model_free(model);

  uint32_t *out = calloc(max_new ? max_new : 1, sizeof *out);
  size_t n_out = 0, pieces = 0;
  int32_t cancel = 0; /* another thread may set it to stop generation */
  s = meo_session_generate(session, prompt, n_prompt, max_new, on_token, &pieces, &cancel, out, max_new, &n_out);
  fputc('\n', stderr);
  if (s != MEO_STATUS_OK) return fail("meo_session_generate", s);

  for (size_t i = 0; i < n_out; i++) printf(i ? " %u" : "%u", out[i]);
  printf("\n");

  MeoStats st;
  if ((s = meo_session_stats(session, &st)) != MEO_STATUS_OK) return fail("meo_session_stats", s);
  fprintf(stderr, "prompt %llu tokens in %.3f s, decode %llu tokens in %.3f s; experts touched %llu of %llu\n",
          (unsigned long long)st.prompt_tokens, st.prompt_seconds, (unsigned long long)st.decode_tokens,
          st.decode_seconds, (unsigned long long)st.experts_touched, (unsigned long long)st.experts_total);

  /* What an app does on a memory warning: expert pages go, and fault back on use. */
  uint64_t released = 0;
  if ((s = meo_session_trim(session, &released)) != MEO_STATUS_OK) return fail("meo_session_trim", s);
  fprintf(stderr, "trim released %llu bytes of expert slabs\n", (unsigned long long)released);

  free(out);
  meo_session_free(session);
  return 0;
}
