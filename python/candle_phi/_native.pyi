"""Type stubs for the Rust extension ``candle_phi._native``. Import from ``candle_phi``."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import final

from typing_extensions import Self, Unpack

from candle_phi.types import ChatMessage, FinishReason, GenerationOptions, KvCacheType

__all__ = [
    "Phi3Generator",
    "TokenEvent",
    "TokenEvents",
    "TokenLogprob",
    "TokenStream",
    "Tokenizer",
    "TopLogprob",
    "__version__",
]

__version__: str

@final
class Phi3Generator:
    """A loaded Phi-3 GGUF model and its tokenizer.

    Immutable and safe to share between threads: each :meth:`generate` call returns a
    :class:`TokenStream` with its own KV cache over the shared weights. Loading releases the
    GIL.

    Args:
        model: Path of a local ``phi3`` GGUF file. When None, ``filename`` is taken from the
            Hugging Face repo ``repo_id`` at ``revision``, through the Hugging Face cache
            (``HF_HUB_CACHE`` / ``HF_HOME``); a cached file loads without network and
            ``HF_HUB_OFFLINE=1`` never touches the network. ``filename`` may be a glob
            (``"*q4.gguf"``) that matches one file.
        tokenizer: Path of a ``tokenizer.json``. When None: ``tokenizer.json`` from
            ``tokenizer_repo_id`` if given, else the one beside a local model, else the
            tokenizer the GGUF itself describes (its ``tokenizer.ggml.*`` metadata).
        progress: Show a download progress bar on stderr when a file is fetched; None (the
            default) shows it when stderr is a terminal.
        n_threads: Threads for the CPU kernels; None means one per physical core. Candle's
            thread pools are process-wide and sized once: the first generator sets the count,
            and a later one asking for another raises InvalidArgumentError.
        prefix_cache_bytes: Most bytes of KV state kept from ended streams (default 4 GiB;
            0 keeps none). A later prompt that starts with the same tokens (the next turn of
            a chat) then computes only the rest; least recently used states go first.
        kv_cache_type: How keys and values are kept: ``"f16"`` (the default, as llama.cpp's;
            2 bytes a value, 384 KiB a token for Phi-3-mini), ``"q8_0"`` (blocks of 32 values
            in 8 bits with one scale: 1.125 bytes, 216 KiB a token; logits move by about 0.6%
            of their spread, rms) or ``"f32"`` (4 bytes, 768 KiB a token; exact).
        repack_weights: Repack the Q4_K, Q5_K, Q6_K and Q4_0 matrices eight rows to a block
            at load (the default, on x86 CPUs with AVX2), as llama.cpp does: the products read
            them about twice as fast, several decoding streams most. They take the place of
            the file's pages, so memory stays at the file's size; False reads every matrix
            from the memory-mapped file, which loads at once and whose pages processes share.

    Raises:
        ModelLoadError: The model file is missing, not a valid ``phi3`` GGUF, or cannot be
            fetched.
        TokenizerError: The tokenizer is missing, invalid, or does not match the model.
        InvalidArgumentError: An argument has the wrong type or value.
    """

    def __new__(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        repo_id: str = "microsoft/Phi-3-mini-4k-instruct-gguf",
        filename: str = "Phi-3-mini-4k-instruct-q4.gguf",
        revision: str = "main",
        tokenizer_repo_id: str | None = None,
        tokenizer_revision: str = "main",
        progress: bool | None = None,
        n_threads: int | None = None,
        prefix_cache_bytes: int = 4294967296,
        kv_cache_type: KvCacheType = "f16",
        repack_weights: bool = True,
    ) -> Self: ...
    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str = "Phi-3-mini-4k-instruct-q4.gguf",
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        revision: str = "main",
        tokenizer_repo_id: str | None = None,
        tokenizer_revision: str = "main",
        progress: bool | None = None,
        n_threads: int | None = None,
        prefix_cache_bytes: int = 4294967296,
        kv_cache_type: KvCacheType = "f16",
        repack_weights: bool = True,
    ) -> Self:
        """``filename`` (or the one file a glob such as ``"*q4.gguf"`` matches) of the hub
        repository ``repo_id``, through the Hugging Face cache."""
    def generate(
        self, prompt: str | Sequence[int], **options: Unpack[GenerationOptions]
    ) -> TokenStream:
        """Start generating from ``prompt``; iterate the stream for the text.

        The prompt is raw text, in which special-token text such as ``<|user|>`` becomes its
        control token, or a list of token ids taken as they are. Nothing is computed until
        the stream is iterated. A prompt that starts with tokens an ended stream of this
        generator computed reuses their state (see ``prefix_cache_bytes``).

        Options (:class:`~candle_phi.types.GenerationOptions`, shared with :meth:`chat`):
        ``max_tokens=256, temperature=0.8, top_p=0.95, top_k=40, min_p=0.0, seed=None,
        repeat_penalty=1.1, repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0,
        logit_bias=None, stop=None, stop_token_ids=None, ignore_eos=False, logprobs=False,
        top_logprobs=None``.

        Raises:
            InvalidArgumentError: An option is out of range or of the wrong type.
            ContextLengthError: Prompt tokens plus ``max_tokens`` exceed the context length.
            TypeError: An unknown option.
        """

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        truncate: bool = False,
        **options: Unpack[GenerationOptions],
    ) -> TokenStream:
        """Start the assistant's reply to a conversation.

        ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}``
        dicts, rendered with the GGUF's ``tokenizer.chat_template`` when it has one, else in
        the Phi-3 format ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``. Text inside a message
        never becomes a control token. The options are those of :meth:`generate`. The next
        turn of a conversation computes only its new tokens: the state of this one is kept.

        Args:
            truncate: When the conversation and ``max_tokens`` do not fit the context, leave
                out its oldest turns (never system messages or the last message) instead
                of raising ContextLengthError; ``TokenStream.dropped_messages`` says how many.

        Raises:
            InvalidArgumentError: A message is malformed or has an unknown role.
            ContextLengthError: The conversation does not fit (even truncated).
        """

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the model's chat template makes of ``messages``."""

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds the tokenizer's BOS."""

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``token_ids``."""

    def token_to_id(self, token: str, /) -> int | None:
        """The id of one vocabulary entry (e.g. ``"<|end|>"``), or None."""

    def logits(
        self, token_ids: Sequence[int], *, chunk_size: int | None = None
    ) -> list[list[float]]:
        """The model's next-token logits at every position of ``token_ids``.

        The tokens are fed ``chunk_size`` at a time (all at once by default). For inspection
        and tests; generation does not need it.
        """

    @property
    def context_length(self) -> int:
        """Tokens the model attends to: prompt plus generated tokens must fit."""

    @property
    def vocab_size(self) -> int:
        """Rows of the model's token embedding."""

    @property
    def end_token_ids(self) -> list[int]:
        """Token ids that end generation by default (``<|end|>``, ``<|endoftext|>``, EOS)."""

    @property
    def model_path(self) -> Path:
        """Local path of the GGUF file in use."""

    @property
    def tokenizer_path(self) -> Path:
        """Local path of the tokenizer.json in use, or of the GGUF when its own tokenizer is."""

    @property
    def kernels(self) -> str:
        """The matrix kernels this CPU runs for the model: "avx-vnni", "avx512-vnni",
        "avx2", "scalar" or "candle" (the environment variable ``CANDLE_PHI_KERNELS`` picks
        another this CPU runs), followed by any tensor types left to Candle's kernels, as in
        "avx2; candle for Q8_K" (every type files hold in practice runs on ours), and how
        much of the weights were repacked at load, as in "avx2; repacked by 8 rows
        (1276 MiB)" (``repack_weights``)."""

    @property
    def n_threads(self) -> int:
        """Threads the CPU kernels run on."""

    @property
    def load_time(self) -> float:
        """Seconds spent resolving and loading the model and tokenizer."""

    @property
    def kv_cache_type(self) -> KvCacheType:
        """How keys and values are kept: ``"f16"``, ``"q8_0"`` or ``"f32"``."""

    @property
    def prefix_cache_bytes(self) -> int:
        """The most bytes of ended streams' KV state kept for reuse (0: none)."""

    @property
    def prefix_cache_usage(self) -> tuple[int, int]:
        """States kept for reuse now, and their bytes."""
    @property
    def active_streams(self) -> int:
        """Streams started and not yet ended (finished, cancelled, closed or dropped)."""
    @property
    def pass_counts(self) -> tuple[int, int]:
        """Forward passes run so far and the stream steps they served: streams stepped at
        the same time share a pass, so steps / passes is the mean batch size."""

@final
class Tokenizer:
    """A GGUF's own tokenizer (its ``tokenizer.ggml.*`` metadata), without its weights."""

    @staticmethod
    def from_gguf(path: str | os.PathLike[str]) -> Tokenizer: ...
    def encode(
        self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids; with ``parse_special=False`` special-token text stays text."""
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...
    def token_to_id(self, token: str, /) -> int | None: ...
    @property
    def end_token_ids(self) -> list[int]: ...

@final
class TokenStream:
    """An iterator over the text of one generation, one token's worth per step.

    Each step releases the GIL while the model computes; Ctrl-C raises
    ``KeyboardInterrupt`` between layers. Joined, the pieces are exactly the decode of
    :attr:`token_ids`; a multi-byte character is never split. ``async for`` and
    :meth:`aread` compute off the event loop; ``with`` closes the stream on exit.
    """

    def __iter__(self) -> Self: ...
    def __next__(self) -> str: ...
    def __aiter__(self) -> Self: ...
    async def __anext__(self) -> str:
        """The next piece, computed in a worker thread; cancelling the awaiting task
        cancels the generation."""

    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> bool: ...
    def read(self) -> str:
        """The rest of the text at once: exactly what iterating would have yielded."""

    async def aread(self) -> str:
        """:meth:`read`, computed off the event loop."""

    def events(self) -> TokenEvents:
        """The same generation as :class:`TokenEvent` s (text with its token ids and
        log-probabilities), sharing its progress with this stream."""

    def cancel(self) -> None:
        """Stop the generation from any thread. The work in progress (a prompt chunk or a
        token) stops at its next layer; the stream then ends with finish_reason
        ``"cancelled"``. Its computed prefix stays reusable."""

    def close(self) -> None:
        """Cancel the generation if it runs and free its state now (the generator's prefix
        cache may keep it for a later prompt)."""

    @property
    def finish_reason(self) -> FinishReason | None:
        """``"stop"`` (end or stop token), ``"length"`` (``max_tokens``), ``"cancelled"``,
        None while running."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt."""

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose state came from an earlier stream instead of being computed."""

    @property
    def dropped_messages(self) -> int:
        """Oldest messages ``chat(..., truncate=True)`` left out to fit the context."""

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far; end and stop tokens are not counted."""

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far."""

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per generated token with ``logprobs=True``, else None."""

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt as token ids, as the model sees it (chat template applied)."""

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the first step to the first generated token, prompt included."""

    @property
    def prompt_tokens_per_second(self) -> float | None:
        """Prompt tokens computed per second, once the prompt is in (reused ones not
        counted)."""

    @property
    def generation_tokens_per_second(self) -> float | None:
        """Generation speed after the first token (needs two or more tokens)."""

    @property
    def seed(self) -> int:
        """The seed in use (drawn at random when none was given)."""

@final
class TokenEvents:
    """Iterates a stream's generation as :class:`TokenEvent` s (also ``async for``)."""

    def __iter__(self) -> Self: ...
    def __next__(self) -> TokenEvent: ...
    def __aiter__(self) -> Self: ...
    async def __anext__(self) -> TokenEvent: ...
    @property
    def stream(self) -> TokenStream:
        """The stream these events come from (its stats, ``cancel``, ``close``)."""

@final
class TokenEvent:
    """A piece of generated text and the tokens it came from."""

    @property
    def text(self) -> str:
        """The text these tokens released; "" only for a last event whose text fell to a
        stop string."""

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens behind ``text`` (end tokens excluded)."""

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per token id with ``logprobs=True``, else None."""

@final
class TokenLogprob:
    """A generated token's natural-log probability under the model's raw distribution
    (log-softmax of the logits before temperature, penalties and filters)."""

    @property
    def token_id(self) -> int: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top_logprobs(self) -> list[TopLogprob]:
        """The ``top_logprobs`` most likely tokens at this position, most likely first."""

@final
class TopLogprob:
    """One of the most likely tokens at a position."""

    @property
    def token_id(self) -> int: ...
    @property
    def logprob(self) -> float: ...
