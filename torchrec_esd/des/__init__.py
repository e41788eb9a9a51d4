"""DES (arXiv 1909.04823): compute partial results next to the weights.

* :mod:`~torchrec_esd.des.sharding`: the DES sharding of an
  ``EmbeddingBagCollection`` (a TorchRec sharder; the DES baseline the
  benchmarks compare with), with its plans (:mod:`~torchrec_esd.des.plan`)
  and the sharded module (:mod:`~torchrec_esd.des.sharded_ebc`).
* :mod:`~torchrec_esd.des.served_misses`: ESD's use of the idea, the PS serving
  cache misses of multi-hot bags as pooled partial sums (which rows, and what
  they cost on the wire).
"""
