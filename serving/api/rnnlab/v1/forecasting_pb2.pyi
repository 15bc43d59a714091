from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Observation(_message.Message):
    __slots__ = ("values", "time")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    time: float
    def __init__(self, values: _Optional[_Iterable[float]] = ..., time: _Optional[float] = ...) -> None: ...

class ForecastStep(_message.Message):
    __slots__ = ("step", "mean", "lower", "upper", "scale")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    step: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    lower: _containers.RepeatedScalarFieldContainer[float]
    upper: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., lower: _Optional[_Iterable[float]] = ..., upper: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ...) -> None: ...

class ForecastRequest(_message.Message):
    __slots__ = ("model", "history", "horizon")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    model: str
    history: _containers.RepeatedCompositeFieldContainer[Observation]
    horizon: int
    def __init__(self, model: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Observation, _Mapping]]] = ..., horizon: _Optional[int] = ...) -> None: ...

class ForecastResponse(_message.Message):
    __slots__ = ("model", "steps", "interval_level")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    steps: _containers.RepeatedCompositeFieldContainer[ForecastStep]
    interval_level: float
    def __init__(self, model: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[ForecastStep, _Mapping]]] = ..., interval_level: _Optional[float] = ...) -> None: ...

class ForecastStreamRequest(_message.Message):
    __slots__ = ("model", "session_id", "state_token", "keep_open", "observations", "horizon", "export")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KEEP_OPEN_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    state_token: bytes
    keep_open: bool
    observations: _containers.RepeatedCompositeFieldContainer[Observation]
    horizon: int
    export: bool
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., state_token: _Optional[bytes] = ..., keep_open: _Optional[bool] = ..., observations: _Optional[_Iterable[_Union[Observation, _Mapping]]] = ..., horizon: _Optional[int] = ..., export: _Optional[bool] = ...) -> None: ...

class ForecastStreamResponse(_message.Message):
    __slots__ = ("steps", "observations", "session_id", "state_token", "interval_level")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[ForecastStep]
    observations: int
    session_id: str
    state_token: bytes
    interval_level: float
    def __init__(self, steps: _Optional[_Iterable[_Union[ForecastStep, _Mapping]]] = ..., observations: _Optional[int] = ..., session_id: _Optional[str] = ..., state_token: _Optional[bytes] = ..., interval_level: _Optional[float] = ...) -> None: ...

class ListForecastersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForecasterInfo(_message.Message):
    __slots__ = ("name", "model", "columns", "window", "horizon", "max_horizon", "interval_level", "evaluation", "bundle_digest", "state_bytes")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    MAX_HORIZON_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    window: int
    horizon: int
    max_horizon: int
    interval_level: float
    evaluation: _containers.ScalarMap[str, float]
    bundle_digest: str
    state_bytes: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ..., window: _Optional[int] = ..., horizon: _Optional[int] = ..., max_horizon: _Optional[int] = ..., interval_level: _Optional[float] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., bundle_digest: _Optional[str] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class ListForecastersResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ForecasterInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ForecasterInfo, _Mapping]]] = ...) -> None: ...
