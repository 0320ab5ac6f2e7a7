"""INT8 training (Jetfire): precision policies, custom_vjp INT8 ops, Flax modules, sharding, checkpoints.

Modules: ``policy`` (:class:`Policy`, named policies), ``policy_rules`` (:func:`apply_policy`),
``jetfire_ops`` (custom_vjp INT8 linear / norm / GELU ops), ``jetfire`` (the fused Jetfire MLP and
attention-input blocks), ``kernels`` (the seam from those ops to the Pallas kernels), ``nn`` (Flax
modules), ``sharding``, ``checkpoint``, ``metrics``.
"""
