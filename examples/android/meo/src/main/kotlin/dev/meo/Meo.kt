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
}
