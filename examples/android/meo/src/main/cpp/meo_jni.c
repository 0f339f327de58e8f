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

JNIEXPORT jintArray JNICALL Java_dev_meo_Meo_nativeTokenize(JNIEnv *env, jclass cls, jlong model, jstring text) {
  (void)cls;
  const char *t = (*env)->GetStringUTFChars(env, text, NULL); /* modified UTF-8: fine without NUL/astral chars */
  if (t == NULL) return NULL;
  size_t n = 0;
  const MeoModel *m = (const MeoModel *)(intptr_t)model;
  MeoStatus s = meo_tokenize(m, t, NULL, 0, &n);
  jintArray out = NULL;
  if (s == MEO_STATUS_OK || s == MEO_STATUS_BUFFER_TOO_SMALL) {
    uint32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    s = meo_tokenize(m, t, ids, n, &n);
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
