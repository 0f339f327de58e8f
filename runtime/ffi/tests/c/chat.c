/* The chat side of the C API (issue 22), run by runtime/ffi/tests/c_chat.rs:
 *
 *   template     meo_chat_apply_template renders a conversation (size query, then the text),
 *                refuses bad arguments with the documented statuses, and a model without a
 *                template with MEO_STATUS_NO_CHAT_TEMPLATE
 *   generate     the rendered chat, tokenized with meo_tokenize_raw, is generated from with
 *                meo_session_generate_with; a stop string cuts the text where it occurs
 *   penalties    a presence penalty larger than any logit gap never repeats a token (nor one of
 *                the prompt), and the new sampler fields are range-checked
 *
 *   ./chat MODEL_WITH_TEMPLATE.meo MODEL_WITHOUT.meo
 *
 * Prints the rendered prompt between "--- prompt" and "--- end", then "ok CHECK" per check
 * passed; each failed expectation goes to stderr as "FAIL ...". Exit status 0 if all passed.
 */
#include "meo.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      fprintf(stderr, "FAIL %s (line %d): ", __func__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                               \
      fprintf(stderr, " [last error: %s]\n", meo_last_error());   \
      failures++;                                                 \
    }                                                             \
  } while (0)

#define EXPECT(call, want)                                                                              \
  do {                                                                                                  \
    int got_ = (int)(call);                                                                             \
    CHECK(got_ == (int)(want), "%s gave %d (%s), want %s", #call, got_, meo_status_string(got_), #want); \
  } while (0)

static const MeoChatMessage CONVERSATION[] = {
    {"system", "Be brief."},
    {"user", "The value of the object"},
    {"assistant", "is returned."},
    {"user", "Ünïcödé?"},
};

/* The rendered conversation (malloc'd), or NULL. */
static char *render(const MeoModel *m, const char *vars) {
  size_t len = 0;
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, vars, NULL, 0, &len), MEO_STATUS_BUFFER_TOO_SMALL);
  char *text = malloc(len + 1);
  size_t len2 = 0;
  /* One byte short: too small again, the same length reported. */
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, vars, text, len, &len2), MEO_STATUS_BUFFER_TOO_SMALL);
  CHECK(len2 == len, "%zu vs %zu", len2, len);
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, vars, text, len + 1, &len2), MEO_STATUS_OK);
  CHECK(len2 == len && strlen(text) == len, "length %zu, strlen %zu", len, strlen(text));
  return text;
}

static void check_template(const MeoModel *m, const MeoModel *bare) {
  int before = failures;
  MeoModelInfo info;
  EXPECT(meo_model_info(m, &info), MEO_STATUS_OK);
  CHECK(info.has_chat_template == 1, "has_chat_template %u", info.has_chat_template);
  EXPECT(meo_model_info(bare, &info), MEO_STATUS_OK);
  CHECK(info.has_chat_template == 0, "has_chat_template %u", info.has_chat_template);

  char *text = render(m, NULL);
  printf("--- prompt\n%s\n--- end\n", text);
  CHECK(strstr(text, "<system>Be brief.\n<user>The value of the object\n<assistant>is returned.\n") != NULL, "%s",
        text);
  CHECK(strstr(text, "<user>Ünïcödé?\n<assistant>") != NULL, "%s", text);
  /* Template variables reach the template. */
  char *loud = render(m, "{\"shout\": true}");
  CHECK(strncmp(loud, "!!", 2) == 0 && strcmp(loud + 2, text) == 0, "%s", loud);
  free(loud);
  free(text);

  char buf[16];
  size_t len = 0;
  EXPECT(meo_chat_apply_template(bare, CONVERSATION, 4, 1, NULL, NULL, 0, &len), MEO_STATUS_NO_CHAT_TEMPLATE);
  CHECK(strstr(meo_last_error(), "no chat template") != NULL, "%s", meo_last_error());
  EXPECT(meo_chat_apply_template(m, NULL, 1, 1, NULL, buf, sizeof buf, &len), MEO_STATUS_NULL_POINTER);
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, NULL, buf, sizeof buf, NULL), MEO_STATUS_NULL_POINTER);
  MeoChatMessage no_role[] = {{NULL, "x"}};
  EXPECT(meo_chat_apply_template(m, no_role, 1, 1, NULL, buf, sizeof buf, &len), MEO_STATUS_NULL_POINTER);
  CHECK(strstr(meo_last_error(), "messages[0].role") != NULL, "%s", meo_last_error());
  MeoChatMessage bad_utf8[] = {{"user", "\xff\xfe"}};
  EXPECT(meo_chat_apply_template(m, bad_utf8, 1, 1, NULL, buf, sizeof buf, &len), MEO_STATUS_INVALID_UTF8);
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, "[1, 2]", buf, sizeof buf, &len),
         MEO_STATUS_INVALID_ARGUMENT);
  EXPECT(meo_chat_apply_template(m, CONVERSATION, 4, 1, "{not json", buf, sizeof buf, &len),
         MEO_STATUS_INVALID_ARGUMENT);
  /* The template's raise_exception: the message is the template's. */
  MeoChatMessage tool[] = {{"tool", "x"}};
  EXPECT(meo_chat_apply_template(m, tool, 1, 1, NULL, buf, sizeof buf, &len), MEO_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(meo_last_error(), "no tool messages here") != NULL, "%s", meo_last_error());
  EXPECT(meo_chat_apply_template(NULL, CONVERSATION, 4, 1, NULL, buf, sizeof buf, &len), MEO_STATUS_NULL_POINTER);
  if (failures == before) printf("ok template\n");
}

typedef struct {
  char text[4096];
  size_t len;
} Collected;

static int32_t collect(void *user_data, uint32_t token, const char *text, size_t text_len) {
  (void)token;
  Collected *c = user_data;
  if (c->len + text_len < sizeof c->text) {
    memcpy(c->text + c->len, text, text_len);
    c->len += text_len;
    c->text[c->len] = 0;
  }
  return 0;
}

/* The prompt tokens of the rendered conversation (malloc'd). */
static uint32_t *prompt_ids(const MeoModel *m, size_t *n) {
  char *text = render(m, NULL);
  EXPECT(meo_tokenize_raw(m, text, NULL, 0, n), MEO_STATUS_BUFFER_TOO_SMALL);
  uint32_t *ids = malloc(*n * sizeof *ids);
  EXPECT(meo_tokenize_raw(m, text, ids, *n, n), MEO_STATUS_OK);
  free(text);
  return ids;
}

static void check_generate(const MeoModel *m) {
  int before = failures;
  size_t n_prompt = 0;
  uint32_t *prompt = prompt_ids(m, &n_prompt);
  CHECK(n_prompt > 10, "%zu prompt tokens", n_prompt);
  MeoSession *s = NULL;
  EXPECT(meo_session_new(m, NULL, &s), MEO_STATUS_OK);

  /* Greedy, 12 tokens, no stops but the model's end of sequence. */
  MeoGenerateOptions o;
  memset(&o, 0, sizeof o);
  o.max_new_tokens = 12;
  o.ignore_eos = 1;
  Collected full = {{0}, 0};
  uint32_t ids[64];
  size_t n = 0;
  MeoStopReason why = MEO_STOP_REASON_CANCELLED;
  EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, collect, &full, NULL, ids, 64, &n, &why), MEO_STATUS_OK);
  CHECK(n == 12 && why == MEO_STOP_REASON_MAX_TOKENS, "n %zu, why %d", n, (int)why);
  CHECK(full.len > 1, "the reply has text: \"%s\"", full.text);

  /* The same with a stop string: a one-byte string from the middle of that text. */
  const char *stop_at = NULL;
  char stop[2] = {0, 0};
  for (size_t i = 1; i < full.len; i++) {
    if ((unsigned char)full.text[i] >= 0x21 && (unsigned char)full.text[i] < 0x7f) {
      stop[0] = full.text[i];
      stop_at = strchr(full.text, stop[0]);
      break;
    }
  }
  CHECK(stop_at != NULL, "no ASCII character after the first in \"%s\"", full.text);
  if (stop_at != NULL) {
    const char *stops[] = {"never appears \x01", stop};
    o.stop_strings = stops;
    o.n_stop_strings = 2;
    Collected cut = {{0}, 0};
    EXPECT(meo_session_reset(s), MEO_STATUS_OK);
    EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, collect, &cut, NULL, NULL, 0, &n, &why), MEO_STATUS_OK);
    size_t want = (size_t)(stop_at - full.text);
    CHECK(why == MEO_STOP_REASON_STOP_STRING, "why %d", (int)why);
    CHECK(cut.len == want && strncmp(cut.text, full.text, want) == 0, "\"%s\" vs the first %zu bytes of \"%s\"",
          cut.text, want, full.text);
    CHECK(n <= 12, "%zu tokens", n);
    const char *empty[] = {""};
    o.stop_strings = empty;
    o.n_stop_strings = 1;
    EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, NULL, 0, &n, NULL),
           MEO_STATUS_INVALID_ARGUMENT);
    const char *null_stop[] = {NULL};
    o.stop_strings = null_stop;
    EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, NULL, 0, &n, NULL),
           MEO_STATUS_NULL_POINTER);
    o.stop_strings = NULL;
    EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, NULL, 0, &n, NULL),
           MEO_STATUS_NULL_POINTER);
    o.n_stop_strings = 0;
  }
  /* An extra stop token: the first token of the full reply ends the generation at once. */
  o.stop_tokens = &ids[0];
  o.n_stop_tokens = 1;
  EXPECT(meo_session_reset(s), MEO_STATUS_OK);
  EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, NULL, 0, &n, &why), MEO_STATUS_OK);
  CHECK(n == 1 && why == MEO_STOP_REASON_STOP_TOKEN, "n %zu, why %d", n, (int)why);
  EXPECT(meo_session_free(s), MEO_STATUS_OK);
  free(prompt);
  if (failures == before) printf("ok generate\n");
}

static void check_penalties(const MeoModel *m) {
  int before = failures;
  size_t n_prompt = 0;
  uint32_t *prompt = prompt_ids(m, &n_prompt);
  MeoSession *s = NULL;
  EXPECT(meo_session_new(m, NULL, &s), MEO_STATUS_OK);
  MeoSamplerOptions so;
  memset(&so, 0, sizeof so);
  so.top_p = 1.0f;
  so.presence_penalty = 1e6f; /* greedy, and no token seen before can win */
  EXPECT(meo_session_set_sampler(s, &so), MEO_STATUS_OK);
  MeoGenerateOptions o;
  memset(&o, 0, sizeof o);
  o.max_new_tokens = 24;
  o.ignore_eos = 1;
  uint32_t ids[24];
  size_t n = 0;
  EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, ids, 24, &n, NULL), MEO_STATUS_OK);
  CHECK(n == 24, "%zu tokens", n);
  for (size_t i = 0; i < n; i++) {
    for (size_t j = 0; j < i; j++) CHECK(ids[i] != ids[j], "token %u repeated at %zu and %zu", ids[i], j, i);
    for (size_t j = 0; j < n_prompt; j++) CHECK(ids[i] != prompt[j], "token %u of the prompt generated", ids[i]);
  }
  /* Range checks of the new fields. */
  so.presence_penalty = 0;
  so.min_p = 1.5f;
  EXPECT(meo_session_set_sampler(s, &so), MEO_STATUS_INVALID_ARGUMENT);
  so.min_p = 0.1f;
  so.repetition_penalty = -1.0f;
  EXPECT(meo_session_set_sampler(s, &so), MEO_STATUS_INVALID_ARGUMENT);
  so.repetition_penalty = 1.3f;
  so.frequency_penalty = 0.5f;
  so.penalty_last_n = 16;
  so.temperature = 0.8f;
  so.seed = 7;
  EXPECT(meo_session_set_sampler(s, &so), MEO_STATUS_OK);
  EXPECT(meo_session_reset(s), MEO_STATUS_OK);
  EXPECT(meo_session_generate_with(s, prompt, n_prompt, &o, NULL, NULL, NULL, ids, 24, &n, NULL), MEO_STATUS_OK);
  EXPECT(meo_session_free(s), MEO_STATUS_OK);
  free(prompt);
  if (failures == before) printf("ok penalties\n");
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL_WITH_TEMPLATE.meo MODEL_WITHOUT.meo\n", argv[0]);
    return 2;
  }
  MeoModel *m = NULL, *bare = NULL;
  EXPECT(meo_model_open(argv[1], &m), MEO_STATUS_OK);
  EXPECT(meo_model_open(argv[2], &bare), MEO_STATUS_OK);
  if (m == NULL || bare == NULL) return 1;
  check_template(m, bare);
  check_generate(m);
  check_penalties(m);
  EXPECT(meo_model_free(m), MEO_STATUS_OK);
  EXPECT(meo_model_free(bare), MEO_STATUS_OK);
  return failures == 0 ? 0 : 1;
}
