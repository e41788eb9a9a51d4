"""Application code built on the library: the DLRM trainer (vanilla TorchRec,
ESD, DES side by side), the synthetic and Criteo TSV workloads and the local
multi-process launcher.  The library (``torchrec_esd`` outside ``apps``)
never imports from here."""
