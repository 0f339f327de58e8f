rootProject.name = "meo-android"
include(":meo")
