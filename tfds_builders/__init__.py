"""TFDS builders for the hand datasets used by peclr_jax.

One sub-package per dataset in the `tfds new` layout:
`tfds_builders.<name>.<name>_dataset_builder.Builder` (freihand,
youtube3d_hands, synthetic_hands, hand_crops), each with a
`fake_data.write_fake_<name>(root, **sizes)` for tests. Build them with
`python -m peclr_jax.data build <name> ...` or
`peclr_jax.data.build_dataset`; the conventions every builder follows
(array_record by default, `regressor_path`, skipped-example counts in
`info.metadata['skipped']`) are in peclr_jax/data.py's docstring.

Nothing is imported here, on purpose: importing a builder module registers
its name with TFDS and may pull in that dataset's dependencies, so callers
import only the one they need. (Keep shared code in sub-modules, not here:
editable installs made before this file existed resolve `tfds_builders` as a
namespace package, which never runs this file.)
"""
