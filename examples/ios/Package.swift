// swift-tools-version:5.9
// Swift wrapper over the meo C API. Needs MeoFFI.xcframework built first (see README.md);
// not built in this repository's CI (no macOS / Xcode here).
import PackageDescription

let package = Package(
    name: "Meo",
    platforms: [.iOS(.v15), .macOS(.v13)],
    products: [.library(name: "Meo", targets: ["Meo"])],
    targets: [
        .binaryTarget(name: "MeoFFI", path: "MeoFFI.xcframework"),
        .target(name: "Meo", dependencies: ["MeoFFI"]),
    ]
)
