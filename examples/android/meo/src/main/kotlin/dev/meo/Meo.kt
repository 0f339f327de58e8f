package dev.meo

import android.content.res.AssetFileDescriptor
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** An error from the meo C API (the message is `meo_last_error()`). */
class MeoException(message: String) : RuntimeException(message)

/** Receives generated text; return false to stop. */
fun interface TextListener {
    fun onText(text: String): Boolean
}

/** One message of a conversation for [MeoModel.applyChatTemplate]. */
data class ChatMessage(val role: String, val content: String)

/** Sampling settings for [MeoSession.setSampler]; the defaults are greedy decoding. */
data class SamplerOptions(
    val temperature: Float = 0f,
    val topK: Int = 0,
    val topP: Float = 1f,
    val seed: Long = 0,
    val minP: Float = 0f,
    val repetitionPenalty: Float = 1f,
    val presencePenalty: Float = 0f,
    val frequencyPenalty: Float = 0f,
    val penaltyLastN: Int = 0,
)

/**
 * A model (shareable across threads) and its sessions, over the C API in `meo.h`.
 * Not built in this repository's CI: see examples/android/README.md.
 */
class MeoModel private constructor(private var handle: Long) : AutoCloseable {
    companion object {
        /** An uncompressed asset (`noCompress += "meo"` in Gradle): mapped lazily, not copied. */
        fun fromAsset(afd: AssetFileDescriptor): MeoModel =
            afd.use { MeoModel(Meo.nativeOpenFd(it.parcelFileDescriptor.fd, it.startOffset, it.length)) }

        fun fromPath(path: String): MeoModel = MeoModel(Meo.nativeOpenPath(path))
    }

    fun tokenize(text: String): IntArray = Meo.nativeTokenize(handle, text)

    /** Tokens of text that already holds its special tokens, such as [applyChatTemplate]'s. */
    fun tokenizeRaw(text: String): IntArray = Meo.nativeTokenizeRaw(handle, text)

    /**
     * The conversation rendered with the model's chat template (`meo_chat_apply_template`);
     * [templateVars] is a JSON object of extra variables, e.g. `{"enable_thinking": false}`.
     */
    fun applyChatTemplate(
        messages: List<ChatMessage>, addGenerationPrompt: Boolean = true, templateVars: String? = null,
    ): String = Meo.nativeChatApplyTemplate(
        handle,
        messages.map { it.role }.toTypedArray(),
        messages.map { it.content }.toTypedArray(),
        addGenerationPrompt,
        templateVars,
    )

    fun newSession(threads: Int = 0): MeoSession = MeoSession(Meo.nativeSessionNew(handle, threads))

    override fun close() {
        if (handle != 0L) Meo.nativeModelFree(handle)
        handle = 0L
    }
}

/** One conversation; use from one thread at a time. */
class MeoSession internal constructor(private var handle: Long) : AutoCloseable {
    /** Set to 1 from any thread to stop [generate]. */
    val cancel: ByteBuffer = ByteBuffer.allocateDirect(4).order(ByteOrder.nativeOrder())

    /** Generates up to [maxNewTokens] tokens after [prompt]; returns the number generated. */
    fun generate(prompt: IntArray, maxNewTokens: Int, listener: TextListener): Int {
        cancel.putInt(0, 0)
        return Meo.nativeGenerate(handle, prompt, maxNewTokens, listener, cancel)
    }

    /**
     * [generate] with stop strings (the text stops before the first one reached) and no
     * token limit when [maxNewTokens] is 0.
     */
    fun generate(prompt: IntArray, maxNewTokens: Int, stopStrings: List<String>, listener: TextListener): Int {
        cancel.putInt(0, 0)
        return Meo.nativeGenerateWith(handle, prompt, maxNewTokens, stopStrings.toTypedArray(), listener, cancel)
    }

    /** Sets temperature, top-k/p, min-p, penalties and seed (`meo_session_set_sampler`). */
    fun setSampler(o: SamplerOptions) = Meo.nativeSetSampler(
        handle, o.temperature, o.topK, o.topP, o.seed, o.minP, o.repetitionPenalty, o.presencePenalty,
        o.frequencyPenalty, o.penaltyLastN,
    )

    /** Call from `ComponentCallbacks2.onTrimMemory`: releases expert pages; returns bytes. */
    fun trim(): Long = Meo.nativeTrim(handle)

    override fun close() {
        if (handle != 0L) Meo.nativeSessionFree(handle)
        handle = 0L
    }
}

internal object Meo {
    init {
        System.loadLibrary("meo_jni")
    }

    @JvmStatic external fun nativeOpenFd(fd: Int, offset: Long, length: Long): Long
    @JvmStatic external fun nativeOpenPath(path: String): Long
    @JvmStatic external fun nativeModelFree(model: Long)
    @JvmStatic external fun nativeSessionNew(model: Long, threads: Int): Long
    @JvmStatic external fun nativeSessionFree(session: Long)
    @JvmStatic external fun nativeTrim(session: Long): Long
    @JvmStatic external fun nativeTokenize(model: Long, text: String): IntArray
    @JvmStatic external fun nativeGenerate(
        session: Long, prompt: IntArray, maxNewTokens: Int, listener: TextListener, cancel: ByteBuffer?,
    ): Int
    @JvmStatic external fun nativeTokenizeRaw(model: Long, text: String): IntArray
    @JvmStatic external fun nativeChatApplyTemplate(
        model: Long, roles: Array<String>, contents: Array<String>, addGenerationPrompt: Boolean, templateVars: String?,
    ): String
    @JvmStatic external fun nativeGenerateWith(
        session: Long, prompt: IntArray, maxNewTokens: Int, stopStrings: Array<String>, listener: TextListener,
        cancel: ByteBuffer?,
    ): Int
    @JvmStatic external fun nativeSetSampler(
        session: Long, temperature: Float, topK: Int, topP: Float, seed: Long, minP: Float, repetitionPenalty: Float,
        presencePenalty: Float, frequencyPenalty: Float, penaltyLastN: Int,
    )
}
