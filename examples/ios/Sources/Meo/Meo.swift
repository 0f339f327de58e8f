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

    /// Tokens of text that already holds its special tokens, such as `applyChatTemplate`'s.
    public func tokenizeRaw(_ text: String) throws -> [UInt32] {
        var n = 0
        let first = meo_tokenize_raw(handle, text, nil, 0, &n)
        if first != MEO_STATUS_BUFFER_TOO_SMALL { try check(first) }
        var ids = [UInt32](repeating: 0, count: n)
        try check(meo_tokenize_raw(handle, text, &ids, n, &n))
        return ids
    }

    /// The conversation rendered with the model's chat template; `templateVars` is a JSON
    /// object of extra variables, e.g. `{"enable_thinking": false}`.
    public func applyChatTemplate(_ messages: [(role: String, content: String)], addGenerationPrompt: Bool = true,
                                  templateVars: String? = nil) throws -> String {
        // C strings that live until the end of this call.
        let roles = messages.map { strdup($0.role) }
        let contents = messages.map { strdup($0.content) }
        defer { (roles + contents).forEach { free($0) } }
        let msgs = zip(roles, contents).map { MeoChatMessage(role: $0, content: $1) }
        let add: Int32 = addGenerationPrompt ? 1 : 0
        var len = 0
        let first = meo_chat_apply_template(handle, msgs, msgs.count, add, templateVars, nil, 0, &len)
        if first != MEO_STATUS_BUFFER_TOO_SMALL { try check(first) }
        var buf = [CChar](repeating: 0, count: len + 1)
        try check(meo_chat_apply_template(handle, msgs, msgs.count, add, templateVars, &buf, buf.count, &len))
        return String(cString: buf)
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

    /// `generate` with stop strings (the text stops before the first one reached); `maxNewTokens`
    /// 0 = no limit but the context.
    public func generate(prompt: [UInt32], maxNewTokens: Int, stopStrings: [String],
                         onText: @escaping (String) -> Bool) throws -> Int {
        final class Box { let f: (String) -> Bool; init(_ f: @escaping (String) -> Bool) { self.f = f } }
        let box = Box(onText)
        let stops = stopStrings.map { UnsafePointer(strdup($0)) }
        defer { stops.forEach { free(UnsafeMutablePointer(mutating: $0)) } }
        var n = 0
        cancel.pointee = 0
        let callback: MeoTokenCallback = { user, _, text, len in
            guard let user, let text, len > 0 else { return 0 }
            let box = Unmanaged<Box>.fromOpaque(user).takeUnretainedValue()
            let bytes = UnsafeRawBufferPointer(start: text, count: len)
            return box.f(String(decoding: bytes, as: UTF8.self)) ? 0 : 1
        }
        let status = stops.withUnsafeBufferPointer { sp in
            var opts = MeoGenerateOptions(max_new_tokens: maxNewTokens, stop_strings: sp.baseAddress,
                                          n_stop_strings: sp.count, stop_tokens: nil, n_stop_tokens: 0, ignore_eos: 0)
            return withExtendedLifetime(box) {
                meo_session_generate_with(handle, prompt, prompt.count, &opts, callback,
                                          Unmanaged.passUnretained(box).toOpaque(), cancel, nil, 0, &n, nil)
            }
        }
        if status != MEO_STATUS_CANCELLED { try check(status) }
        return n
    }

    /// Temperature (0 = greedy), top-k/p, min-p, penalties (repetition 1 = none) and seed.
    public func setSampler(temperature: Float = 0, topK: UInt32 = 0, topP: Float = 1, seed: UInt64 = 0,
                           minP: Float = 0, repetitionPenalty: Float = 1, presencePenalty: Float = 0,
                           frequencyPenalty: Float = 0, penaltyLastN: UInt32 = 0) throws {
        var o = MeoSamplerOptions(temperature: temperature, top_k: topK, top_p: topP, seed: seed, min_p: minP,
                                  repetition_penalty: repetitionPenalty, presence_penalty: presencePenalty,
                                  frequency_penalty: frequencyPenalty, penalty_last_n: penaltyLastN)
        try check(meo_session_set_sampler(handle, &o))
    }

    /// Call on `UIApplication.didReceiveMemoryWarningNotification`: releases expert pages.
    @discardableResult
    public func trim() throws -> UInt64 {
        var released: UInt64 = 0
        try check(meo_session_trim(handle, &released))
        return released
    }
}
