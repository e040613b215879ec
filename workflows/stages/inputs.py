"""Stage 1, the inputs: everything that can be checked before a teacher trains or runs (the input
files, the view function, the deploy target, feature KD's layers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from workflows import ingest, train, validate
from workflows import precompute as pre
from kd_ops.fsio import Loc
from workflows.layout import Layout
from workflows.loop import FeaturePlan


def check_run(task, dirs: dict[str, Path], lay: Layout, *, target: bool = False) -> FeaturePlan | None:
    """Everything that can be checked before a teacher trains or runs: the inputs (`check_inputs`),
    the view function (`check_views`), with `target` the deploy target (`check_target`) and feature
    KD's layers; returns the feature plan (`feature_plan`)."""
    check_inputs(task, dirs, lay)
    if target:
        check_target(task.cfg)
    return feature_plan(task, dirs, lay)


def check_target(cfg) -> None:
    """Some node can hold the deploy stage's timing task (`deploy.target`): ResourceWaitError naming
    the resources after train.resource_wait_s otherwise (nodes may still be on their way), instead
    of a run that hangs after all its training."""
    if not cfg.deploy.enabled:
        return
    opts = cfg.deploy.target.ray_options()
    bundle = {"CPU": opts["num_cpus"], **opts.get("resources", {})}
    if opts.get("accelerator_type"):
        bundle |= {"GPU": 1, f"accelerator_type:{opts['accelerator_type']}": 0.001}
    train.wait_for_a_node(bundle, "deploy.target", "Fix deploy.target (threads, resources, accelerator_type) to "
                          "match a node, add such a node, or set deploy.enabled: false", cfg.train.resource_wait_s)


def check_inputs(task, dirs: dict[str, Path], lay: Layout) -> None:
    """`workflows.validate.check_inputs` for this run's inputs (remembered under --out/checks)."""
    cfg = task.cfg
    validate.check_inputs(dirs, feature_columns=task.feature_columns, label_column=task.label_column,
                          num_classes=task.num_classes,
                          remember=lay.out / "checks")
    if cfg.precompute.views > 1:
        check_views(task, dirs)


def check_views(task, dirs) -> None:
    """The view function on the first training rows, before any teacher trains or runs: it
    imports, keeps shape and dtype, returns the rows themselves for view 0, and gives a row the
    same view whether it is asked for one view (precompute) or one view per row (training)."""
    from kd_ops import augment, models

    pc = task.cfg.precompute
    fn = models.resolve(pc.augment)
    x = ingest.first_rows(dirs["train"], task.feature_columns, task.input_dtype, n=4)
    ids, views = np.arange(len(x)), np.arange(len(x)) % pc.views
    if not np.array_equal(augment.apply(fn, x, ids, 0, pc.augment_seed), x):
        raise ValueError(f"precompute.augment {pc.augment!r}: view 0 must return the inputs unchanged")
    per_row = augment.apply(fn, x, ids, views, pc.augment_seed)
    one = np.concatenate([augment.apply(fn, x[i:i + 1], ids[i:i + 1], int(views[i]), pc.augment_seed)
                          for i in range(len(x))])
    if not np.array_equal(per_row, one):
        raise ValueError(f"precompute.augment {pc.augment!r}: a row's view differs when views come one per row "
                         "(an array) rather than as one int; it must depend only on (seed, id, view)")


def feature_plan(task, dirs, lay: Layout) -> FeaturePlan | None:
    """The Loop's `features`: layers, shapes and where the teacher's features come from. Builds
    the teacher (untrained: shapes do not depend on weights) and the student on the first input
    rows, so a wrong layer name or shapes no projection can map fail before any teacher is
    trained or run (`feature_kd.LayerError`)."""
    cfg = task.cfg
    f = cfg.distill.feature
    if f is None:
        return None
    from kd_ops import feature_kd, models
    import torch

    t = cfg.feature_teacher()
    example = torch.from_numpy(ingest.first_rows(dirs["train"], task.feature_columns, task.input_dtype))
    tap = feature_kd.LayerOutput(models.build(t.factory, t.kwargs), f.teacher_layer, f.pool).eval()
    t_shape = list(pre.forward(f"teacher {t.name!r}", tap, example.numpy()).shape[1:])
    feature_kd.feature_student(models.build(cfg.student.factory, cfg.student.kwargs), f.student_layer, example,
                               t_shape, f.kind)
    return FeaturePlan(student_layer=f.student_layer, teacher_layer=f.teacher_layer, source=f.source, pool=f.pool,
                       input_shape=list(example.shape[1:]), input_dtype=task.input_dtype, teacher_shape=t_shape,
                       store_entry=pre.feature_entry(t.name, f.teacher_layer, f.pool), teacher_factory=t.factory,
                       teacher_kwargs=t.kwargs, teacher_weights=Loc.of(lay.teacher_weights(t)).uri)
