// Swift API over the meo C API (runtime/ffi/include/meo.h, shipped inside MeoFFI.xcframework
// with a module map exposing it as module `MeoFFI`). Not built in this repository's CI.
import Foundation
import MeoFFI

public struct MeoError: Error, CustomStringConvertible {
    public let status: MeoStatus
    public let description: String
}

@discardableResult
private func check(_ status: MeoStatus) throws -> MeoStatus {
    guard status == MEO_STATUS_OK else {
        throw MeoError(status: status, description: String(cString: meo_last_error()))
    }
    return status
}

/// A model, memory-mapped lazily. Safe to share across threads.
public final class Model: @unchecked Sendable {
    let handle: OpaquePointer

    /// Opens a `.meo` file, e.g. `Bundle.main.path(forResource: "model", ofType: "meo")`.
    public init(path: String) throws {
        var out: OpaquePointer?
        try check(meo_model_open(path, &out))
        handle = out!
    }

    deinit { meo_model_free(handle) }

    public func tokenize(_ text: String) throws -> [UInt32] {
        var n = 0
        let first = meo_tokenize(handle, text, nil, 0, &n)
        if first != MEO_STATUS_BUFFER_TOO_SMALL { try check(first) }
        var ids = [UInt32](repeating: 0, count: n)
        try check(meo_tokenize(handle, text, &ids, n, &n))
        return ids
    }
}

/// One conversation. Use from one thread (or actor) at a time.
public final class Session {
    let handle: OpaquePointer
    let model: Model
    /// Set to 1 from another thread to stop `generate`.
    public let cancel = UnsafeMutablePointer<Int32>.allocate(capacity: 1)

    public init(model: Model, threads: UInt32 = 0) throws {
        var opts = MeoSessionOptions(threads: threads, max_context: 0)
        var out: OpaquePointer?
        try check(meo_session_new(model.handle, &opts, &out))
        handle = out!
        self.model = model
        cancel.initialize(to: 0)
    }

    deinit {
        meo_session_free(handle)
        cancel.deallocate()
    }

    /// Generates up to `maxNewTokens` tokens after `prompt`, streaming text to `onText`
    /// (return false to stop). Returns the generated ids.
    public func generate(prompt: [UInt32], maxNewTokens: Int, onText: @escaping (String) -> Bool) throws -> [UInt32] {
        final class Box { let f: (String) -> Bool; init(_ f: @escaping (String) -> Bool) { self.f = f } }
        let box = Box(onText)
        var out = [UInt32](repeating: 0, count: maxNewTokens)
        var n = 0
        cancel.pointee = 0
        let callback: MeoTokenCallback = { user, _, text, len in
            guard let user, let text, len > 0 else { return 0 }
            let box = Unmanaged<Box>.fromOpaque(user).takeUnretainedValue()
            let bytes = UnsafeRawBufferPointer(start: text, count: len)
            return box.f(String(decoding: bytes, as: UTF8.self)) ? 0 : 1
        }
        let status = withExtendedLifetime(box) {
            meo_session_generate(handle, prompt, prompt.count, maxNewTokens, callback,
                                 Unmanaged.passUnretained(box).toOpaque(), cancel, &out, out.count, &n)
        }
        if status != MEO_STATUS_CANCELLED { try check(status) }
        return Array(out.prefix(min(n, out.count)))
    }

    /// Call on `UIApplication.didReceiveMemoryWarningNotification`: releases expert pages.
    @discardableResult
    public func trim() throws -> UInt64 {
        var released: UInt64 = 0
        try check(meo_session_trim(handle, &released))
        return released
    }
}
