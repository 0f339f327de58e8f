// Android library module: Kotlin API (dev.meo) + JNI glue linked against libmeo_ffi.a.
// Build the static library first (see ../README.md); not built in this repository's CI.
plugins {
    id("com.android.library") version "8.7.0"
    id("org.jetbrains.kotlin.android") version "2.0.21"
}

android {
    namespace = "dev.meo"
    compileSdk = 35
    ndkVersion = "27.2.12479018" // r27: 16 KiB page-aligned native libraries by default
    defaultConfig {
        minSdk = 26
        ndk { abiFilters += listOf("arm64-v8a") }
        externalNativeBuild { cmake { arguments += listOf("-DANDROID_SUPPORT_FLEXIBLE_PAGE_SIZES=ON") } }
    }
    externalNativeBuild { cmake { path = file("src/main/cpp/CMakeLists.txt") } }
    // .meo assets must be stored uncompressed so meo_model_open_fd can map them.
    androidResources { noCompress += "meo" }
}
