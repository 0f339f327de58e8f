"""meo: run Mixture-of-Experts models from one lazily memory-mapped .meo file.

Convert a Hugging Face checkpoint (``convert``), open the file (``Model``), generate text
(``Model.generate``, whole or streamed), chat with the model's own chat template
(``Model.chat``) and measure a routing mode against vanilla (``Model.eval``). Every call does
what the ``meo`` command of the same name does (docs/CLI.md); docs/PYTHON.md is the reference.
Long calls release the GIL; Ctrl-C raises ``KeyboardInterrupt`` between tokens.
"""

from os import PathLike
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union, overload

__version__: str

StrPath = Union[str, PathLike[str]]
Message = Mapping[str, Any]
StopReason = Literal["max_tokens", "stop_token", "stop_string", "context_full", "cancelled"]

class MeoError(Exception):
    """Base class of the errors meo raises (bad arguments raise ValueError, missing files
    FileNotFoundError)."""

class ConvertError(MeoError):
    """A checkpoint could not be converted; the message names the problem (no output is left)."""

class ModelError(MeoError):
    """A file is not a model this runtime runs (not a .meo file, corrupt, truncated, refused)."""

class GenerateError(MeoError):
    """A generation failed (the model or the output)."""

class ChatTemplateError(MeoError):
    """The chat template is missing, does not compile, or refused the conversation."""

class EvalError(MeoError):
    """An evaluation failed (a forward pass was refused)."""

class ConvertSummary:
    """What a conversion wrote."""

    output: str
    architecture: str
    tensors: int
    file_bytes: int
    checkpoint_bytes: int
    """Bytes of tensor data in the checkpoint."""

def convert(
    hf_dir: StrPath,
    output: StrPath,
    *,
    experts: Literal["int8", "int4", "mxfp4", "f16", "f32"] = "int8",
    dense: Literal["int8", "int4", "f16", "f32"] = "f16",
    align_experts: Optional[bool] = None,
    tasks: Optional[Mapping[str, StrPath]] = None,
    merge_weighting: Literal["mean-gate", "frequency"] = "mean-gate",
    calib: Optional[StrPath] = None,
    hot_experts: float = 0.0,
    compress: Optional[str] = None,
    progress: bool = False,
) -> ConvertSummary:
    """Convert a Hugging Face MoE checkpoint directory into one .meo file (``meo convert``).

    Args:
        hf_dir: config.json, model.safetensors (or an index with shards), tokenizer.json and,
            for chat, tokenizer_config.json / chat_template.jinja.
        output: the .meo file, written to a temporary file beside it and renamed when complete.
        experts: routed expert storage (``--experts``).
        dense: dense matrix storage (``--dense``); norms, biases and routers stay f32.
        align_experts: store experts aligned to expert 0 of their layer; None: on with tasks.
        tasks: task name -> calibration text; precomputes the MEO merge of each task
            (``--task NAME=FILE``), run with ``Model(path, mode="task:NAME")``.
        merge_weighting: how task merge weights are computed (``--merge-weighting``).
        calib: calibration text for activation-aware 4-bit scales and ``hot_experts``.
        hot_experts: share (0..1) of each layer's experts kept int8 beside 4-bit ones.
        compress: ``"METHOD:FRACTION"`` (``--compress``: ``prune``, ``reap``, ``mc-smoe`` or
            ``eep``, and the share of each layer's experts removed), chosen on ``calib``.
        progress: draw a progress bar on stderr (when it is a terminal).

    Raises:
        FileNotFoundError: hf_dir, a task's text or calib does not exist.
        ValueError: an option is misspelt.
        ConvertError: the checkpoint cannot be converted (the message says why).
    """

class ChatTemplate:
    """A Jinja chat template, rendered as transformers' ``apply_chat_template`` renders it."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        unk_token: Optional[str] = None,
        now: Optional[int] = None,
    ) -> None:
        """Compiles ``source``; ``now`` fixes ``strftime_now`` (Unix seconds, UTC).

        Raises:
            ChatTemplateError: the template does not compile.
        """
    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        template_vars: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """Renders a conversation: dicts with role and content (and any other fields the template
        reads: tool_calls, reasoning_content, …); ``template_vars`` are extra variables
        (``enable_thinking``, ``tools``, …).

        Raises:
            ChatTemplateError: the template refused the conversation or failed.
            ValueError: the messages or variables cannot be written as JSON.
        """

class Completion:
    """The result of a generation."""

    text: Optional[str]
    """The generated text (stop strings and the stop token's text left out); None when the
    file has no tokenizer."""
    tokens: list[int]
    """The generated ids, a final stop token included (as in transformers' generate)."""
    stop_reason: StopReason
    prompt_tokens: int
    prompt_seconds: float
    decode_steps: int
    decode_seconds: float

class Chunk:
    """One piece of a streamed generation."""

    token: Optional[int]
    """The generated id; None for the last piece of held-back text (an incomplete character
    or a stop string's prefix that did not complete)."""
    text: str
    """The text this token completes (often empty for a token inside a character)."""

class TokenStream(Iterator[Chunk]):
    """Chunks as they are generated (on a thread of its own; dropping the stream stops it)."""

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> Chunk: ...
    @property
    def completion(self) -> Optional[Completion]:
        """The finished generation; None until the iterator is exhausted."""
    def cancel(self) -> None:
        """Stops the generation; the stream then ends with stop_reason "cancelled"."""

class EvalReport:
    """What ``Model.eval`` measured (the fields of ``meo eval --json``)."""

    mode: str
    merged_layers: list[int]
    windows: int
    scored_tokens: int
    perplexity: float
    vanilla_perplexity: float
    next_token_agreement: float
    kl_vs_vanilla: float
    merge_error_per_layer: dict[int, float]
    expert_bytes_per_token: float
    vanilla_expert_bytes_per_token: float

class Model:
    """A .meo model, memory-mapped: opening reads the header only, and only the experts that
    routing selects are ever read."""

    def __init__(
        self,
        path: StrPath,
        *,
        threads: int = 0,
        mode: Optional[str] = None,
        merge_layers: str = "all",
        merge_budget: float = 0.25,
        prompt_pool: Literal["mean-gate", "pooled-input"] = "mean-gate",
        kv: Literal["f32", "f16", "int8"] = "f32",
    ) -> None:
        """Opens ``path``. ``threads``: worker threads (0 = one per physical core). ``mode``:
        ``vanilla``, ``prompt`` or ``task:NAME`` (default: vanilla, prompt for an MEO-native
        model), with ``merge_layers`` (``all``, ``"0,2"``, ``auto``), ``merge_budget`` and
        ``prompt_pool`` as ``meo run``'s flags of those names. ``kv``: how sessions store the
        KV cache, as ``meo run --kv`` (``f32`` exact; ``f16``, ``int8`` smaller).

        Raises:
            FileNotFoundError: no such file.
            ModelError: not a model this runtime runs.
            ValueError: a misspelt mode or layer list, or a task the file does not have.
        """
    @property
    def path(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def kv(self) -> str: ...
    @property
    def has_tokenizer(self) -> bool: ...
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Text to ids with the file's tokenizer (ValueError when it has none)."""
    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids to text with the file's tokenizer."""
    @overload
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_last_n: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        stream: Literal[False] = False,
    ) -> Completion: ...
    @overload
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_last_n: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        stream: Literal[True],
    ) -> TokenStream:
        """Continues ``prompt`` (text, encoded with the file's tokenizer as ``meo run -p`` does,
        or token ids as ``--tokens``). Sampling options left None take the file's generation
        defaults (greedy when it has none); ``stop`` strings end the text. With
        ``stream=True`` returns a TokenStream.

        Raises:
            ValueError: a text prompt without a tokenizer, an empty or too long prompt, an
                out-of-range sampling option.
            GenerateError: the model failed.
        """
    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int = 512,
        template: Optional[str] = None,
        template_vars: Optional[Mapping[str, Any]] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_last_n: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        stream: Literal[False] = False,
    ) -> Completion: ...
    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int = 512,
        template: Optional[str] = None,
        template_vars: Optional[Mapping[str, Any]] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_last_n: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        stream: Literal[True],
    ) -> TokenStream:
        """The assistant's reply to ``messages``, rendered with the model's chat template
        (``template``: a named one instead of the default; ``template_vars``: extra variables
        such as ``{"enable_thinking": False}``). Stops at the model's end-of-sequence ids and
        the template's eos token. Sampling options as ``generate``.

        Raises:
            ChatTemplateError: the file has no chat template, or it refused the conversation.
            ValueError: no tokenizer, or an option out of range.
            GenerateError: the model failed.
        """
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        template: Optional[str] = None,
        template_vars: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """The prompt text ``chat`` feeds for ``messages``."""
    def eval(self, text: str, *, window: int = 128, prompt_len: int = 32, max_windows: int = 0) -> EvalReport:
        """Measures this model's mode against vanilla on ``text`` (``meo eval``): windows of
        ``window`` tokens, the first ``prompt_len`` of each not scored; ``max_windows`` = 0
        for all.

        Raises:
            ValueError: the window does not exceed prompt_len by 2, or the text is too short.
            EvalError: a forward pass was refused.
        """
