from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClientProfile(_message.Message):
    __slots__ = ("rank", "device", "memory_bytes", "num_examples", "software_version", "model_fingerprint", "task", "model_loads", "refusal")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    memory_bytes: int
    num_examples: int
    software_version: str
    model_fingerprint: str
    task: str
    model_loads: int
    refusal: str
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ..., software_version: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., task: _Optional[str] = ..., model_loads: _Optional[int] = ..., refusal: _Optional[str] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("task", "model", "dataset", "labels", "max_length", "fingerprint")
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    task: str
    model: str
    dataset: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    fingerprint: str
    def __init__(self, task: _Optional[str] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class UpdateMetadata(_message.Message):
    __slots__ = ("model_fingerprint", "base_version", "rank", "num_examples", "loss_mean", "loss_sq_mean", "duration_s", "steps", "started_at", "queue_s", "model_loads", "trainer_pid", "samples", "site_epsilon")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_MEAN_FIELD_NUMBER: _ClassVar[int]
    LOSS_SQ_MEAN_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_PID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SITE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    base_version: int
    rank: int
    num_examples: int
    loss_mean: float
    loss_sq_mean: float
    duration_s: float
    steps: int
    started_at: float
    queue_s: float
    model_loads: int
    trainer_pid: int
    samples: int
    site_epsilon: float
    def __init__(self, model_fingerprint: _Optional[str] = ..., base_version: _Optional[int] = ..., rank: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss_mean: _Optional[float] = ..., loss_sq_mean: _Optional[float] = ..., duration_s: _Optional[float] = ..., steps: _Optional[int] = ..., started_at: _Optional[float] = ..., queue_s: _Optional[float] = ..., model_loads: _Optional[int] = ..., trainer_pid: _Optional[int] = ..., samples: _Optional[int] = ..., site_epsilon: _Optional[float] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("alpha", "rslora", "target_modules", "dtype")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    RSLORA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    rslora: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    def __init__(self, alpha: _Optional[float] = ..., rslora: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("base_version", "rank", "local_steps", "batch_size", "lr", "prox_mu", "seed", "pushed_at", "software_version", "arrays", "frozen", "lora", "task_spec", "eval_fraction", "freeze_a", "dp_sgd_clip", "dp_sgd_noise", "dp_delta")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TASK_SPEC_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FREEZE_A_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_CLIP_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_NOISE_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    rank: int
    local_steps: int
    batch_size: int
    lr: float
    prox_mu: float
    seed: int
    pushed_at: float
    software_version: str
    arrays: _containers.RepeatedCompositeFieldContainer[Tensor]
    frozen: _containers.RepeatedCompositeFieldContainer[Tensor]
    lora: LoraSpec
    task_spec: TaskSpec
    eval_fraction: float
    freeze_a: bool
    dp_sgd_clip: float
    dp_sgd_noise: float
    dp_delta: float
    def __init__(self, base_version: _Optional[int] = ..., rank: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., prox_mu: _Optional[float] = ..., seed: _Optional[int] = ..., pushed_at: _Optional[float] = ..., software_version: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., frozen: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., task_spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., eval_fraction: _Optional[float] = ..., freeze_a: _Optional[bool] = ..., dp_sgd_clip: _Optional[float] = ..., dp_sgd_noise: _Optional[float] = ..., dp_delta: _Optional[float] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("metadata", "arrays")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    metadata: UpdateMetadata
    arrays: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, metadata: _Optional[_Union[UpdateMetadata, _Mapping]] = ..., arrays: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("base_version", "rank", "software_version", "arrays", "lora", "task_spec", "frozen", "eval_fraction", "max_examples", "personalize_steps", "batch_size", "lr", "seed")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TASK_SPEC_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZE_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    rank: int
    software_version: str
    arrays: _containers.RepeatedCompositeFieldContainer[Tensor]
    lora: LoraSpec
    task_spec: TaskSpec
    frozen: _containers.RepeatedCompositeFieldContainer[Tensor]
    eval_fraction: float
    max_examples: int
    personalize_steps: int
    batch_size: int
    lr: float
    seed: int
    def __init__(self, base_version: _Optional[int] = ..., rank: _Optional[int] = ..., software_version: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., task_spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., frozen: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., eval_fraction: _Optional[float] = ..., max_examples: _Optional[int] = ..., personalize_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("loss", "accuracy", "num_examples", "model_fingerprint", "extra", "personal_loss", "personal_accuracy")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    num_examples: int
    model_fingerprint: str
    extra: _containers.ScalarMap[str, float]
    personal_loss: float
    personal_accuracy: float
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., extra: _Optional[_Mapping[str, float]] = ..., personal_loss: _Optional[float] = ..., personal_accuracy: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("task_spec",)
    TASK_SPEC_FIELD_NUMBER: _ClassVar[int]
    task_spec: TaskSpec
    def __init__(self, task_spec: _Optional[_Union[TaskSpec, _Mapping]] = ...) -> None: ...
