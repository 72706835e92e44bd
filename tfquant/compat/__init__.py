"""Bridges from tfquant's quantizer math to other quantization toolkits.

`tfquant.compat.tfmot` offers QIL, LSQ and CPQ as tensorflow-model-optimization
quantizers for legacy Keras (tf_keras) models. Submodules load their toolkit
lazily, so importing this package needs nothing beyond tfquant itself.
"""
