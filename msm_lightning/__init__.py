"""msm-lightning: masked spectrogram modelling with Transformer, Mamba and xLSTM encoders."""

__version__ = "0.1.0"
