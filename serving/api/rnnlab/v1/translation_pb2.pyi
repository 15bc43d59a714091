from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TranslateOptions(_message.Message):
    __slots__ = ("beam_size", "max_length_ratio", "max_length", "length_penalty", "n_best")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    N_BEST_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    max_length_ratio: float
    max_length: int
    length_penalty: float
    n_best: int
    def __init__(self, beam_size: _Optional[int] = ..., max_length_ratio: _Optional[float] = ..., max_length: _Optional[int] = ..., length_penalty: _Optional[float] = ..., n_best: _Optional[int] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "sentences", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    sentences: _containers.RepeatedScalarFieldContainer[str]
    options: TranslateOptions
    def __init__(self, model: _Optional[str] = ..., sentences: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[TranslateOptions, _Mapping]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "score", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TranslationResult(_message.Message):
    __slots__ = ("hypotheses", "failed", "error", "source_tokens")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    failed: bool
    error: str
    source_tokens: int
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., failed: _Optional[bool] = ..., error: _Optional[str] = ..., source_tokens: _Optional[int] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TranslationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TranslationResult, _Mapping]]] = ...) -> None: ...

class TranslateStreamRequest(_message.Message):
    __slots__ = ("id", "sentence", "model", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    sentence: str
    model: str
    options: TranslateOptions
    def __init__(self, id: _Optional[str] = ..., sentence: _Optional[str] = ..., model: _Optional[str] = ..., options: _Optional[_Union[TranslateOptions, _Mapping]] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("id", "result")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    result: TranslationResult
    def __init__(self, id: _Optional[str] = ..., result: _Optional[_Union[TranslationResult, _Mapping]] = ...) -> None: ...

class ListTranslatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TranslatorInfo(_message.Message):
    __slots__ = ("name", "source_language", "target_language", "attention", "source_vocab_size", "target_vocab_size", "evaluation", "bundle_digest")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_language: str
    target_language: str
    attention: bool
    source_vocab_size: int
    target_vocab_size: int
    evaluation: _containers.ScalarMap[str, float]
    bundle_digest: str
    def __init__(self, name: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., attention: _Optional[bool] = ..., source_vocab_size: _Optional[int] = ..., target_vocab_size: _Optional[int] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., bundle_digest: _Optional[str] = ...) -> None: ...

class ListTranslatorsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[TranslatorInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[TranslatorInfo, _Mapping]]] = ...) -> None: ...
