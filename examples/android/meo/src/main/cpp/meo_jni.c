/* JNI glue between dev.meo.Meo (Kotlin) and the meo C API (runtime/ffi/include/meo.h).
 * Not built in this repository's CI (no Android NDK here): see ../../../../README.md. */
#include <jni.h>
#include <stdint.h>
#include <stdlib.h>

#include "meo.h"

static void throw_meo(JNIEnv *env, MeoStatus s) {
  jclass cls = (*env)->FindClass(env, "dev/meo/MeoException");
  if (cls != NULL) (*env)->ThrowNew(env, cls, meo_last_error());
  (void)s;
}

/* Opens a model from an asset's file descriptor (AssetFileDescriptor: fd, offset, length). */
JNIEXPORT jlong JNICALL Java_dev_meo_Meo_nativeOpenFd(JNIEnv *env, jclass cls, jint fd, jlong offset,
                                                      jlong length) {
  (void)cls;
  MeoModel *m = NULL;
  MeoStatus s = meo_model_open_fd(fd, (uint64_t)offset, (uint64_t)length, &m);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
  return (jlong)(intptr_t)m;
}

JNIEXPORT jlong JNICALL Java_dev_meo_Meo_nativeOpenPath(JNIEnv *env, jclass cls, jstring path) {
  (void)cls;
  const char *p = (*env)->GetStringUTFChars(env, path, NULL);
  if (p == NULL) return 0;
  MeoModel *m = NULL;
  MeoStatus s = meo_model_open(p, &m);
  (*env)->ReleaseStringUTFChars(env, path, p);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
  return (jlong)(intptr_t)m;
}

JNIEXPORT void JNICALL Java_dev_meo_Meo_nativeModelFree(JNIEnv *env, jclass cls, jlong model) {
  (void)env, (void)cls;
  meo_model_free((MeoModel *)(intptr_t)model);
}

JNIEXPORT jlong JNICALL Java_dev_meo_Meo_nativeSessionNew(JNIEnv *env, jclass cls, jlong model, jint threads) {
  (void)cls;
  MeoSessionOptions o = {0};
  o.threads = (uint32_t)threads;
  MeoSession *s = NULL;
  MeoStatus st = meo_session_new((const MeoModel *)(intptr_t)model, &o, &s);
  if (st != MEO_STATUS_OK) throw_meo(env, st);
  return (jlong)(intptr_t)s;
}

JNIEXPORT void JNICALL Java_dev_meo_Meo_nativeSessionFree(JNIEnv *env, jclass cls, jlong session) {
  (void)env, (void)cls;
  meo_session_free((MeoSession *)(intptr_t)session);
}

JNIEXPORT jlong JNICALL Java_dev_meo_Meo_nativeTrim(JNIEnv *env, jclass cls, jlong session) {
  (void)cls;
  uint64_t released = 0;
  MeoStatus s = meo_session_trim((MeoSession *)(intptr_t)session, &released);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
  return (jlong)released;
}

typedef MeoStatus (*tokenize_fn)(const MeoModel *, const char *, uint32_t *, size_t, size_t *);

static jintArray tokenize_with(JNIEnv *env, tokenize_fn tokenize, jlong model, jstring text) {
  const char *t = (*env)->GetStringUTFChars(env, text, NULL); /* modified UTF-8: fine without NUL/astral chars */
  if (t == NULL) return NULL;
  size_t n = 0;
  const MeoModel *m = (const MeoModel *)(intptr_t)model;
  MeoStatus s = tokenize(m, t, NULL, 0, &n);
  jintArray out = NULL;
  if (s == MEO_STATUS_OK || s == MEO_STATUS_BUFFER_TOO_SMALL) {
    uint32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    s = tokenize(m, t, ids, n, &n);
    if (s == MEO_STATUS_OK) {
      out = (*env)->NewIntArray(env, (jsize)n);
      if (out != NULL) (*env)->SetIntArrayRegion(env, out, 0, (jsize)n, (const jint *)ids);
    }
    free(ids);
  }
  (*env)->ReleaseStringUTFChars(env, text, t);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
  return out;
}

JNIEXPORT jintArray JNICALL Java_dev_meo_Meo_nativeTokenize(JNIEnv *env, jclass cls, jlong model, jstring text) {
  (void)cls;
  return tokenize_with(env, meo_tokenize, model, text);
}

JNIEXPORT jintArray JNICALL Java_dev_meo_Meo_nativeTokenizeRaw(JNIEnv *env, jclass cls, jlong model, jstring text) {
  (void)cls;
  return tokenize_with(env, meo_tokenize_raw, model, text);
}

/* The conversation (roles[i], contents[i]) rendered with the model's chat template. */
JNIEXPORT jstring JNICALL Java_dev_meo_Meo_nativeChatApplyTemplate(JNIEnv *env, jclass cls, jlong model,
                                                                  jobjectArray roles, jobjectArray contents,
                                                                  jboolean add_generation_prompt, jstring vars) {
  (void)cls;
  jsize n = (*env)->GetArrayLength(env, roles);
  MeoChatMessage *msgs = calloc(n ? (size_t)n : 1, sizeof *msgs);
  jstring *strs = calloc(n ? 2 * (size_t)n : 1, sizeof *strs);
  for (jsize i = 0; i < n; i++) {
    strs[2 * i] = (jstring)(*env)->GetObjectArrayElement(env, roles, i);
    strs[2 * i + 1] = (jstring)(*env)->GetObjectArrayElement(env, contents, i);
    msgs[i].role = (*env)->GetStringUTFChars(env, strs[2 * i], NULL);
    msgs[i].content = (*env)->GetStringUTFChars(env, strs[2 * i + 1], NULL);
  }
  const char *v = vars ? (*env)->GetStringUTFChars(env, vars, NULL) : NULL;
  const MeoModel *m = (const MeoModel *)(intptr_t)model;
  size_t len = 0;
  jstring out = NULL;
  MeoStatus s = meo_chat_apply_template(m, msgs, (size_t)n, add_generation_prompt ? 1 : 0, v, NULL, 0, &len);
  if (s == MEO_STATUS_OK || s == MEO_STATUS_BUFFER_TOO_SMALL) {
    char *text = malloc(len + 1);
    s = meo_chat_apply_template(m, msgs, (size_t)n, add_generation_prompt ? 1 : 0, v, text, len + 1, &len);
    if (s == MEO_STATUS_OK) out = (*env)->NewStringUTF(env, text); /* modified UTF-8: see nativeTokenize */
    free(text);
  }
  if (v) (*env)->ReleaseStringUTFChars(env, vars, v);
  for (jsize i = 0; i < n; i++) {
    if (msgs[i].role) (*env)->ReleaseStringUTFChars(env, strs[2 * i], msgs[i].role);
    if (msgs[i].content) (*env)->ReleaseStringUTFChars(env, strs[2 * i + 1], msgs[i].content);
    (*env)->DeleteLocalRef(env, strs[2 * i]);
    (*env)->DeleteLocalRef(env, strs[2 * i + 1]);
  }
  free(strs);
  free(msgs);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
  return out;
}

JNIEXPORT void JNICALL Java_dev_meo_Meo_nativeSetSampler(JNIEnv *env, jclass cls, jlong session, jfloat temperature,
                                                         jint top_k, jfloat top_p, jlong seed, jfloat min_p,
                                                         jfloat repetition_penalty, jfloat presence_penalty,
                                                         jfloat frequency_penalty, jint penalty_last_n) {
  (void)cls;
  MeoSamplerOptions o = {0};
  o.temperature = temperature;
  o.top_k = (uint32_t)top_k;
  o.top_p = top_p;
  o.seed = (uint64_t)seed;
  o.min_p = min_p;
  o.repetition_penalty = repetition_penalty;
  o.presence_penalty = presence_penalty;
  o.frequency_penalty = frequency_penalty;
  o.penalty_last_n = (uint32_t)penalty_last_n;
  MeoStatus s = meo_session_set_sampler((MeoSession *)(intptr_t)session, &o);
  if (s != MEO_STATUS_OK) throw_meo(env, s);
}

struct cb_ctx {
  JNIEnv *env;
  jobject listener;
  jmethodID on_text;
};

static int32_t on_token(void *user_data, uint32_t token, const char *text, size_t text_len) {
  struct cb_ctx *c = user_data;
  (void)token;
  if (text_len == 0) return 0;
  char *z = malloc(text_len + 1);
  for (size_t i = 0; i < text_len; i++) z[i] = text[i];
  z[text_len] = 0;
  jstring s = (*c->env)->NewStringUTF(c->env, z);
  free(z);
  jboolean go = (*c->env)->CallBooleanMethod(c->env, c->listener, c->on_text, s);
  (*c->env)->DeleteLocalRef(c->env, s);
  return ((*c->env)->ExceptionCheck(c->env) || !go) ? 1 : 0;
}

/* Generates after `prompt`; streams text to listener.onText(String): Boolean (false stops).
 * `cancel` is a direct ByteBuffer of 4 bytes (an int32 another thread may set to 1), or null. */
JNIEXPORT jint JNICALL Java_dev_meo_Meo_nativeGenerate(JNIEnv *env, jclass cls, jlong session, jintArray prompt,
                                                       jint max_new_tokens, jobject listener, jobject cancel) {
  (void)cls;
  jsize n = (*env)->GetArrayLength(env, prompt);
  jint *ids = (*env)->GetIntArrayElements(env, prompt, NULL);
  struct cb_ctx c = {env, listener, NULL};
  jclass lc = (*env)->GetObjectClass(env, listener);
  c.on_text = (*env)->GetMethodID(env, lc, "onText", "(Ljava/lang/String;)Z");
  const int32_t *flag = cancel ? (const int32_t *)(*env)->GetDirectBufferAddress(env, cancel) : NULL;
  size_t generated = 0;
  MeoStatus s = meo_session_generate((MeoSession *)(intptr_t)session, (const uint32_t *)ids, (size_t)n,
                                     (size_t)max_new_tokens, on_token, &c, flag, NULL, 0, &generated);
  (*env)->ReleaseIntArrayElements(env, prompt, ids, JNI_ABORT);
  if (s != MEO_STATUS_OK && s != MEO_STATUS_CANCELLED && !(*env)->ExceptionCheck(env)) throw_meo(env, s);
  return (jint)generated;
}

/* nativeGenerate with stop strings (String[]) and max_new_tokens 0 = no limit. */
JNIEXPORT jint JNICALL Java_dev_meo_Meo_nativeGenerateWith(JNIEnv *env, jclass cls, jlong session, jintArray prompt,
                                                           jint max_new_tokens, jobjectArray stops, jobject listener,
                                                           jobject cancel) {
  (void)cls;
  jsize n = (*env)->GetArrayLength(env, prompt);
  jint *ids = (*env)->GetIntArrayElements(env, prompt, NULL);
  jsize n_stops = (*env)->GetArrayLength(env, stops);
  const char **stop = calloc(n_stops ? (size_t)n_stops : 1, sizeof *stop);
  jstring *stop_refs = calloc(n_stops ? (size_t)n_stops : 1, sizeof *stop_refs);
  for (jsize i = 0; i < n_stops; i++) {
    stop_refs[i] = (jstring)(*env)->GetObjectArrayElement(env, stops, i);
    stop[i] = (*env)->GetStringUTFChars(env, stop_refs[i], NULL);
  }
  struct cb_ctx c = {env, listener, NULL};
  jclass lc = (*env)->GetObjectClass(env, listener);
  c.on_text = (*env)->GetMethodID(env, lc, "onText", "(Ljava/lang/String;)Z");
  const int32_t *flag = cancel ? (const int32_t *)(*env)->GetDirectBufferAddress(env, cancel) : NULL;
  MeoGenerateOptions o = {0};
  o.max_new_tokens = (size_t)max_new_tokens;
  o.stop_strings = stop;
  o.n_stop_strings = (size_t)n_stops;
  size_t generated = 0;
  MeoStatus s = meo_session_generate_with((MeoSession *)(intptr_t)session, (const uint32_t *)ids, (size_t)n, &o,
                                          on_token, &c, flag, NULL, 0, &generated, NULL);
  for (jsize i = 0; i < n_stops; i++) {
    (*env)->ReleaseStringUTFChars(env, stop_refs[i], stop[i]);
    (*env)->DeleteLocalRef(env, stop_refs[i]);
  }
  free(stop_refs);
  free(stop);
  (*env)->ReleaseIntArrayElements(env, prompt, ids, JNI_ABORT);
  if (s != MEO_STATUS_OK && s != MEO_STATUS_CANCELLED && !(*env)->ExceptionCheck(env)) throw_meo(env, s);
  return (jint)generated;
}
