"""Quantization data shared by ``insert-quant-stubs`` and every int8 backend.

One calibration serves every int8 lowering (see DESIGN.md): calibration runs the *fp32*
graph once and records, for every tensor a quantizer could ever be placed on, its range
and a histogram. Everything after that is derived without running the model again.

- :mod:`~graphopt.quant.calibrate`: :class:`QParams`, observers, ``calibrate``, range
  selection (``minmax``, ``histogram`` = L2-optimal clipping, ``entropy`` = TensorRT's
  KL calibration) for an activation scheme: ``u8`` (asymmetric, ``quint8``) or ``s8``
  (symmetric, ``qint8``, zero point 0).
- :mod:`~graphopt.quant.simulate`: the *simulated int8* modules: :class:`ActFakeQuant`
  (quantize-dequantize one activation in fp32) and :class:`QuantLayer` (a conv/linear
  with fake-quantized weights, symmetric int8 per output channel), and the two
  strategy protocols through which a lowering makes them round as its kernels do.
- :mod:`~graphopt.quant.regions`: op roles. conv/linear (also fused ConvReLU/LinearReLU),
  add, mul, cat and BatchNorm2d are *anchors* with their own output quantizer; a ReLU
  (and ReLU6 after conv/linear) that is the anchor's only user is absorbed. Max pooling,
  ReLU, flatten, view/reshape/permute, chunk/split, slicing and dropout keep their
  input's quantization (*passthrough*); average pooling, mean and ReLU6/hardtanh keep it
  but round again (*requant*). Everything else runs in fp32.
- :mod:`~graphopt.quant.place`: placing quantizers on an fp32 graph (``place``), taking
  them off (``strip``), deriving qparams for a scheme (switching scheme re-derives in
  place, never re-calibrates), :func:`quantize_program` and the :class:`QuantInfo`
  record it leaves in ``program.meta``.
- :mod:`~graphopt.quant.check`: verification split in two, :func:`quantization_error`
  (simulated vs fp32) and :func:`lowering_error` (backend vs simulated), the lowering
  checks and :func:`verify_int8`.

Plain fake-quantization is one step away from a real kernel on a few elements per
million (float32 accumulation order, ties rounded with the zero point on one side or the
other), and in deep nets those flips compound. So a lowering may install its kernels'
arithmetic: a :class:`Rounding` on each :class:`ActFakeQuant` (``rounding``) and a
:class:`LayerArithmetic` on each :class:`QuantLayer` (``arithmetic``). The core defines
only these protocols; the concrete classes live in the backend whose kernels they
describe (cpu-int8, ort-int8), and its artifacts then match the simulation bit for bit.
:func:`clear_kernel_arithmetic` (also run by ``derive_qparams``) sets them all back to
None: plain fake-quantization.
"""

from graphopt.quant.calibrate import SCHEMES, Observer, QParams, activation_qparams, select_range
from graphopt.quant.check import check_lowering, check_lowering_local, lowering_error, quantization_error, verify_int8
from graphopt.quant.place import (
    CALIBRATION_KEY,
    META_KEY,
    QuantConfig,
    QuantInfo,
    quantize_program,
    rederive,
    strip,
)
from graphopt.quant.regions import OpKind, absorbable_activation, anchor_inputs, is_add, is_cat, op_kind, pool_window
from graphopt.quant.simulate import (
    ActFakeQuant,
    LayerArithmetic,
    QuantLayer,
    Rounding,
    clear_kernel_arithmetic,
    kernel_arithmetic_off,
    quantizer_of,
    silence_quantized_deprecation,
)

__all__ = [
    "SCHEMES",
    "QParams",
    "Observer",
    "activation_qparams",
    "select_range",
    "ActFakeQuant",
    "QuantLayer",
    "Rounding",
    "LayerArithmetic",
    "clear_kernel_arithmetic",
    "kernel_arithmetic_off",
    "quantizer_of",
    "silence_quantized_deprecation",
    "OpKind",
    "op_kind",
    "absorbable_activation",
    "anchor_inputs",
    "is_add",
    "is_cat",
    "pool_window",
    "META_KEY",
    "CALIBRATION_KEY",
    "QuantConfig",
    "QuantInfo",
    "quantize_program",
    "rederive",
    "strip",
    "quantization_error",
    "lowering_error",
    "check_lowering",
    "check_lowering_local",
    "verify_int8",
]
