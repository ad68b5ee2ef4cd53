"""Type stubs for the Rust extension ``candle_phi._native``. Import from ``candle_phi``."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import final

from typing_extensions import Self

from candle_phi.types import ChatMessage, FinishReason

__all__ = ["Phi3Generator", "TokenStream", "__version__"]

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
            ``HF_HUB_OFFLINE=1`` never touches the network.
        tokenizer: Path of a ``tokenizer.json``. When None: ``tokenizer.json`` from
            ``tokenizer_repo_id`` if given, else the one beside a local model, else the
            tokenizer of ``microsoft/Phi-3-mini-4k-instruct``.
        progress: Show a download progress bar on stderr when a file is fetched.
        n_threads: Threads for the CPU kernels; None means one per physical core. Candle's
            thread pools are process-wide and sized once: the first generator sets the count,
            and a later one asking for another raises InvalidArgumentError.

    Raises:
        ModelLoadError: The model file is missing, not a valid ``phi3`` GGUF, or cannot be
            fetched.
        TokenizerError: The tokenizer is missing, invalid, or does not match the model.
        InvalidArgumentError: An argument has the wrong type.
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
        progress: bool = False,
        n_threads: int | None = None,
    ) -> Self: ...
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.8,
        top_p: float | None = 0.95,
        top_k: int | None = 40,
        seed: int | None = None,
        repeat_penalty: float = 1.1,
        repeat_last_n: int = 64,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> TokenStream:
        """Start generating from ``prompt``; iterate the stream for the text.

        The prompt is raw text, in which special-token text such as ``<|user|>`` becomes its
        control token, or a list of token ids taken as they are. Nothing is computed until
        the stream is iterated.

        Args:
            max_tokens: Most tokens to generate; None fills the rest of the context.
            temperature: 0 means greedy (argmax) decoding.
            top_p: Nucleus sampling mass in (0, 1]; None or 1 keeps every token.
            top_k: Sample among the ``top_k`` most likely tokens; None keeps every token.
            seed: The same seed always gives the same text; None draws a fresh seed.
            repeat_penalty: Penalty (> 0, 1 is off) on the last ``repeat_last_n`` generated
                tokens.
            stop: Strings that end generation. The text ends just before the first one,
                which is never yielded, not even in part.
            stop_token_ids: Token ids that end generation besides the model's end tokens.
            ignore_eos: Generate past the model's end tokens (for benchmarks).

        Raises:
            InvalidArgumentError: An argument is out of range or of the wrong type.
            ContextLengthError: Prompt tokens plus ``max_tokens`` exceed the context length.
        """

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.8,
        top_p: float | None = 0.95,
        top_k: int | None = 40,
        seed: int | None = None,
        repeat_penalty: float = 1.1,
        repeat_last_n: int = 64,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> TokenStream:
        """Start the assistant's reply to a conversation.

        ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}``
        dicts, rendered with the GGUF's ``tokenizer.chat_template`` when it has one, else in
        the Phi-3 format ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``. Text inside a message
        never becomes a control token. The other arguments are those of :meth:`generate`.

        Raises:
            InvalidArgumentError: A message is malformed or has an unknown role.
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
        """Local path of the tokenizer.json in use."""

    @property
    def n_threads(self) -> int:
        """Threads the CPU kernels run on."""

    @property
    def load_time(self) -> float:
        """Seconds spent resolving and loading the model and tokenizer."""

@final
class TokenStream:
    """An iterator over the text of one generation, one token's worth per step.

    Each step releases the GIL while the model computes; Ctrl-C raises
    ``KeyboardInterrupt`` between prompt chunks and tokens. Joined, the pieces are exactly
    the decode of :attr:`token_ids`; a multi-byte character is never split.
    """

    def __iter__(self) -> Self: ...
    def __next__(self) -> str: ...
    def read(self) -> str:
        """The rest of the text at once: exactly what iterating would have yielded."""

    @property
    def finish_reason(self) -> FinishReason | None:
        """``"stop"`` (end or stop token), ``"length"`` (``max_tokens``), None while running."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt."""

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far; end and stop tokens are not counted."""

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far."""

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt as token ids, as the model sees it (chat template applied)."""

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the first step to the first generated token, prompt included."""

    @property
    def prompt_tokens_per_second(self) -> float | None:
        """Prompt processing speed, once the prompt is in."""

    @property
    def generation_tokens_per_second(self) -> float | None:
        """Generation speed after the first token (needs two or more tokens)."""

    @property
    def seed(self) -> int:
        """The seed in use (drawn at random when none was given)."""
