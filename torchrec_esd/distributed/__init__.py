"""The execution side, shaped like ``torchrec.distributed``.

* :mod:`.runtime`: the per-rank roles (a worker role and a PS role) and their
  process groups;
* :mod:`.input_dist`: :class:`EsdInputDist`, which dispatches the samples of a
  global batch and hands the iteration plan to the sharded module through the
  :mod:`.plan_channel`;
* :mod:`.sharding`: the sharder and the sharded ``EmbeddingBagCollection``,
  composed of a :mod:`.row_store` on the module's device, a :mod:`.lookup`
  backend chosen by ``compute_kernel``, and the PS sync (:mod:`.ps_sync`);
* :mod:`.planner` (its plan and resources in :mod:`.plan_types`), :mod:`.dense_sync`,
  :mod:`.fused_config`, :mod:`.loss_scaling`.
"""
