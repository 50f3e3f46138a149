"""Pretraining with Lightning: the LightningModule, the DataModule, optimiser, callbacks and `msm fit`."""
