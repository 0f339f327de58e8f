/* The C API against careless and hostile callers (issue 19, items 1-4), run under valgrind by
 * runtime/ffi/tests/c_misuse.rs:
 *
 *   status_string  meo_status_string takes any int; values outside MeoStatus give "unknown status"
 *   stale_handles  a freed handle stays invalid after new models and sessions are made
 *   reentrancy     calls on a session from its own generate callback (free included) are refused
 *   concurrent     a call on a session another thread is using is refused; so is its free
 *   threads        several threads run sessions over one model (freed first) concurrently, and
 *                  each gets the single-thread tokens
 *
 *   ./misuse MODEL.meo MAX_NEW_TOKENS ID,ID,... [CHECK...]   (no CHECK: all of them)
 *
 * Prints the single-thread generated ids on one line, then "ok CHECK" per check passed; each
 * failed expectation goes to stderr as "FAIL ...". Exit status 0 if everything passed.
 */
#include "meo.h"

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "FAIL %s (line %d): ", __func__, __LINE__);          \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, " [last error: %s]\n", meo_last_error());            \
      __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);                  \
    }                                                                      \
  } while (0)

/* `call` returns `want`. */
#define EXPECT(call, want)                                                                    \
  do {                                                                                        \
    int got_ = (int)(call);                                                                   \
    CHECK(got_ == (int)(want), "%s gave %d (%s), want %s", #call, got_, meo_status_string(got_), #want); \
  } while (0)

static const char *model_path;
static uint32_t prompt[256];
static size_t n_prompt;
static size_t n_new;
/* The tokens one session on one thread generates: what every other run must give. */
static uint32_t reference[256];
static size_t n_reference;

static MeoModel *open_model(void) {
  MeoModel *m = NULL;
  EXPECT(meo_model_open(model_path, &m), MEO_STATUS_OK);
  return m;
}

static MeoSession *new_session(const MeoModel *m) {
  MeoSessionOptions o = {1, 0}; /* one worker thread: quicker under valgrind */
  MeoSession *s = NULL;
  EXPECT(meo_session_new(m, &o, &s), MEO_STATUS_OK);
  return s;
}

static int same_as_reference(const uint32_t *ids, size_t n) {
  return n == n_reference && memcmp(ids, reference, n * sizeof *ids) == 0;
}

static int greedy(MeoSession *s, MeoTokenCallback cb, void *user, uint32_t *out, size_t *n) {
  return meo_session_generate(s, prompt, n_prompt, n_new, cb, user, NULL, out, n_new, n);
}

static void status_string(void) {
  CHECK(strcmp(meo_status_string(MEO_STATUS_OK), "ok") == 0, "MEO_STATUS_OK: %s", meo_status_string(0));
  CHECK(strstr(meo_status_string(MEO_STATUS_BUSY), "in use") != NULL, "BUSY: %s",
        meo_status_string(MEO_STATUS_BUSY));
  const int bad[] = {-1, MEO_STATUS_INVALID_STATE + 1, 99, 1000, INT_MAX, INT_MIN};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    const char *s = meo_status_string(bad[i]);
    CHECK(s != NULL && strcmp(s, "unknown status") == 0, "meo_status_string(%d) = %s", bad[i], s ? s : "NULL");
  }
}

static void stale_handles(void) {
  MeoModel *m1 = open_model();
  EXPECT(meo_model_free(m1), MEO_STATUS_OK);
  MeoModel *m2 = open_model();
  CHECK(m2 != m1, "a new model got the freed model's handle %p", (void *)m1);
  MeoModelInfo info;
  EXPECT(meo_model_info(m1, &info), MEO_STATUS_INVALID_HANDLE);
  EXPECT(meo_model_free(m1), MEO_STATUS_INVALID_HANDLE);

  MeoSession *s1 = new_session(m2);
  EXPECT(meo_session_free(s1), MEO_STATUS_OK);
  MeoSession *later[4];
  for (int i = 0; i < 4; i++) {
    later[i] = new_session(m2);
    CHECK(later[i] != s1, "new session %d got the freed session's handle %p", i, (void *)s1);
  }
  size_t pos = 0;
  EXPECT(meo_session_position(s1, &pos), MEO_STATUS_INVALID_HANDLE);
  EXPECT(meo_session_feed(s1, prompt, n_prompt), MEO_STATUS_INVALID_HANDLE);
  EXPECT(meo_session_reset(s1), MEO_STATUS_INVALID_HANDLE);
  EXPECT(meo_session_free(s1), MEO_STATUS_INVALID_HANDLE);
  /* A handle of one kind is not a handle of the other. */
  EXPECT(meo_session_reset((MeoSession *)m2), MEO_STATUS_INVALID_HANDLE);
  EXPECT(meo_model_info((const MeoModel *)later[0], &info), MEO_STATUS_INVALID_HANDLE);
  for (int i = 0; i < 4; i++) EXPECT(meo_session_free(later[i]), MEO_STATUS_OK);
  EXPECT(meo_model_free(m2), MEO_STATUS_OK);
}

/* What the generate callback tried on its own session, and the statuses it got. */
struct reentry {
  MeoSession *s;
  MeoModel *m;
  int calls;
  int busy_message;
  int statuses[16];
  const char *names[16];
  int n;
  int others[4]; /* calls on the model and on another session: all OK */
};

#define TRY(r, call)          \
  do {                        \
    (r)->names[(r)->n] = #call; \
    (r)->statuses[(r)->n++] = (int)(call); \
  } while (0)

static int32_t reenter(void *user, uint32_t token, const char *text, size_t len) {
  (void)token, (void)text, (void)len;
  struct reentry *r = user;
  if (r->calls++ != 0) return 0;
  MeoSession *s = r->s;
  uint32_t t = 0;
  const float *logits = NULL;
  size_t n = 0;
  uint64_t released = 0;
  MeoStats st;
  TRY(r, meo_session_free(s));
  r->busy_message = strstr(meo_last_error(), "in use") != NULL;
  TRY(r, meo_session_feed(s, prompt, 1));
  TRY(r, meo_session_sample(s, &t));
  TRY(r, meo_session_logits(s, &logits, &n));
  TRY(r, meo_session_reset(s));
  TRY(r, meo_session_position(s, &n));
  TRY(r, meo_session_stats(s, &st));
  TRY(r, meo_session_set_mode(s, "vanilla", NULL, 0.25));
  TRY(r, meo_session_set_target(s, "cpu"));
  TRY(r, meo_session_set_threads(s, 1));
  TRY(r, meo_session_set_sampler(s, NULL));
  TRY(r, meo_session_set_memory_budget(s, 0));
  TRY(r, meo_session_trim(s, &released));
  TRY(r, meo_session_generate(s, prompt, n_prompt, 1, NULL, NULL, NULL, NULL, 0, NULL));
  TRY(r, meo_session_free(s));
  /* The model and other sessions are not in use. */
  MeoModelInfo info;
  r->others[0] = meo_model_info(r->m, &info);
  MeoSession *other = NULL;
  MeoSessionOptions o = {1, 0};
  r->others[1] = meo_session_new(r->m, &o, &other);
  r->others[2] = other ? (int)meo_session_feed(other, prompt, n_prompt) : -1;
  r->others[3] = meo_session_free(other);
  return 0;
}

static void reentrancy(void) {
  MeoModel *m = open_model();
  MeoSession *s = new_session(m);
  struct reentry r = {.s = s, .m = m};
  uint32_t out[256];
  size_t n = 0;
  EXPECT(greedy(s, reenter, &r, out, &n), MEO_STATUS_OK);
  CHECK(r.calls > 0, "the callback never ran");
  for (int i = 0; i < r.n; i++)
    CHECK(r.statuses[i] == MEO_STATUS_BUSY, "from the callback, %s gave %d (%s), want MEO_STATUS_BUSY", r.names[i],
          r.statuses[i], meo_status_string(r.statuses[i]));
  CHECK(r.busy_message, "the BUSY message does not say the session is in use");
  for (int i = 0; i < 4; i++)
    CHECK(r.others[i] == MEO_STATUS_OK, "from the callback, call %d on the model or another session gave %d", i,
          r.others[i]);
  /* The refused calls changed nothing. */
  CHECK(same_as_reference(out, n), "the callback's refused calls changed the output");
  /* Free the model first: the session keeps it alive, and is usable again after the call. */
  EXPECT(meo_model_free(m), MEO_STATUS_OK);
  size_t pos = 0;
  EXPECT(meo_session_position(s, &pos), MEO_STATUS_OK);
  CHECK(pos == n_prompt + n - 1, "position %zu after the call, want %zu", pos, n_prompt + n - 1);
  EXPECT(meo_session_reset(s), MEO_STATUS_OK);
  EXPECT(greedy(s, NULL, NULL, out, &n), MEO_STATUS_OK);
  CHECK(same_as_reference(out, n), "the session's second generation differs");
  EXPECT(meo_session_free(s), MEO_STATUS_OK);
  EXPECT(meo_session_free(s), MEO_STATUS_INVALID_HANDLE);
}

/* A generate on one thread that waits, inside its first callback, for the main thread. */
struct holder {
  MeoSession *s;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int inside, release;
  int status;
  uint32_t out[256];
  size_t n;
};

static int32_t hold(void *user, uint32_t token, const char *text, size_t len) {
  (void)token, (void)text, (void)len;
  struct holder *h = user;
  pthread_mutex_lock(&h->lock);
  if (!h->inside) {
    h->inside = 1;
    pthread_cond_broadcast(&h->cond);
    while (!h->release) pthread_cond_wait(&h->cond, &h->lock);
  }
  pthread_mutex_unlock(&h->lock);
  return 0;
}

static void *hold_thread(void *user) {
  struct holder *h = user;
  h->status = greedy(h->s, hold, h, h->out, &h->n);
  return NULL;
}

/* Threads calling one session with no coordination: every call is OK or BUSY. */
static void *hammer(void *user) {
  MeoSession *s = user;
  for (int i = 0; i < 200; i++) {
    size_t pos = 0;
    MeoStats st;
    int a = meo_session_position(s, &pos);
    int b = meo_session_stats(s, &st);
    int c = meo_session_set_mode(s, "vanilla", NULL, 0.25);
    CHECK((a == MEO_STATUS_OK || a == MEO_STATUS_BUSY) && (b == MEO_STATUS_OK || b == MEO_STATUS_BUSY) &&
              (c == MEO_STATUS_OK || c == MEO_STATUS_BUSY),
          "uncoordinated calls gave %d %d %d", a, b, c);
  }
  return NULL;
}

static void concurrent(void) {
  MeoModel *m = open_model();
  struct holder h = {.s = new_session(m)};
  pthread_mutex_init(&h.lock, NULL);
  pthread_cond_init(&h.cond, NULL);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, hold_thread, &h) == 0, "pthread_create");
  pthread_mutex_lock(&h.lock);
  while (!h.inside) pthread_cond_wait(&h.cond, &h.lock);
  pthread_mutex_unlock(&h.lock);
  /* The other thread is inside meo_session_generate now. */
  size_t pos = 0;
  EXPECT(meo_session_feed(h.s, prompt, 1), MEO_STATUS_BUSY);
  CHECK(strstr(meo_last_error(), "in use") != NULL, "BUSY message: %s", meo_last_error());
  EXPECT(meo_session_position(h.s, &pos), MEO_STATUS_BUSY);
  EXPECT(meo_session_reset(h.s), MEO_STATUS_BUSY);
  EXPECT(meo_session_free(h.s), MEO_STATUS_BUSY);
  pthread_mutex_lock(&h.lock);
  h.release = 1;
  pthread_cond_broadcast(&h.cond);
  pthread_mutex_unlock(&h.lock);
  pthread_join(t, NULL);
  EXPECT(h.status, MEO_STATUS_OK);
  CHECK(same_as_reference(h.out, h.n), "the held generation differs from the reference");
  EXPECT(meo_session_position(h.s, &pos), MEO_STATUS_OK);

  pthread_t ts[4];
  for (int i = 0; i < 4; i++) CHECK(pthread_create(&ts[i], NULL, hammer, h.s) == 0, "pthread_create");
  for (int i = 0; i < 4; i++) pthread_join(ts[i], NULL);
  EXPECT(meo_session_free(h.s), MEO_STATUS_OK);
  EXPECT(meo_model_free(m), MEO_STATUS_OK);
  pthread_cond_destroy(&h.cond);
  pthread_mutex_destroy(&h.lock);
}

struct runner {
  MeoSession *s;
  int status;
  uint32_t out[256];
  size_t n;
};

static void *run_session(void *user) {
  struct runner *r = user;
  r->status = greedy(r->s, NULL, NULL, r->out, &r->n);
  return NULL;
}

static void threads(void) {
  enum { T = 4 };
  MeoModel *m = open_model();
  struct runner rs[T];
  for (int i = 0; i < T; i++) rs[i] = (struct runner){.s = new_session(m)};
  /* The sessions keep the model alive while they run. */
  EXPECT(meo_model_free(m), MEO_STATUS_OK);
  pthread_t ts[T];
  for (int i = 0; i < T; i++) CHECK(pthread_create(&ts[i], NULL, run_session, &rs[i]) == 0, "pthread_create");
  for (int i = 0; i < T; i++) pthread_join(ts[i], NULL);
  for (int i = 0; i < T; i++) {
    EXPECT(rs[i].status, MEO_STATUS_OK);
    CHECK(same_as_reference(rs[i].out, rs[i].n), "thread %d's tokens differ from the single-thread run", i);
    EXPECT(meo_session_free(rs[i].s), MEO_STATUS_OK);
  }
}

static const struct {
  const char *name;
  void (*run)(void);
} checks[] = {
    {"status_string", status_string}, {"stale_handles", stale_handles}, {"reentrancy", reentrancy},
    {"concurrent", concurrent},       {"threads", threads},
};

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s MODEL.meo MAX_NEW_TOKENS ID,ID,... [CHECK...]\n", argv[0]);
    return 2;
  }
  model_path = argv[1];
  n_new = (size_t)strtoul(argv[2], NULL, 10);
  if (n_new == 0 || n_new > 256) {
    fprintf(stderr, "MAX_NEW_TOKENS must be 1..256\n");
    return 2;
  }
  for (char *p = argv[3]; *p && n_prompt < 256;) {
    char *end;
    prompt[n_prompt++] = (uint32_t)strtoul(p, &end, 10);
    if (end == p) {
      fprintf(stderr, "bad token list %s\n", argv[3]);
      return 2;
    }
    p = *end == ',' ? end + 1 : end;
  }

  MeoModel *m = open_model();
  MeoSession *s = m ? new_session(m) : NULL;
  if (!s) return 1;
  EXPECT(greedy(s, NULL, NULL, reference, &n_reference), MEO_STATUS_OK);
  EXPECT(meo_session_free(s), MEO_STATUS_OK);
  EXPECT(meo_model_free(m), MEO_STATUS_OK);
  for (size_t i = 0; i < n_reference; i++) printf(i ? " %u" : "%u", reference[i]);
  printf("\n");
  fflush(stdout);

  size_t n_checks = sizeof checks / sizeof checks[0];
  for (size_t i = 0; i < n_checks; i++) {
    int wanted = argc == 4;
    for (int a = 4; a < argc; a++) wanted |= strcmp(argv[a], checks[i].name) == 0;
    if (!wanted) continue;
    int before = __atomic_load_n(&failures, __ATOMIC_RELAXED);
    checks[i].run();
    if (__atomic_load_n(&failures, __ATOMIC_RELAXED) == before) printf("ok %s\n", checks[i].name);
    fflush(stdout);
  }
  return failures == 0 ? 0 : 1;
}
