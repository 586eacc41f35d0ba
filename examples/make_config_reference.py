"""Regenerate docs/config_reference.md from the classes' signatures and docstrings.

Usage: python examples/make_config_reference.py > docs/config_reference.md
"""

import dataclasses
import inspect
import re

from docstring_parser import parse

import vidssl.callbacks as callbacks
import vidssl.data as data
import vidssl.evaluation.probe as probe
import vidssl.methods as methods

SECTIONS = [
    ("Methods (`model:`)", [methods.SimCLR, methods.MoCo, methods.ClusterTriplet,
                            methods.ClusterContrast, methods.GOCA, methods.CrossModalContrast]),
    ("Supervised evaluation (`model:`)", [probe.LinearProbe, probe.FineTune]),
    ("Data (`data:`)", [data.VideoDataModule]),
    ("Callbacks (`trainer.callbacks:`)", [callbacks.PseudoLabels, callbacks.RetrievalMonitor]),
]


def _docs(cls):
    """Argument descriptions from the class docstring and its bases' (first one wins)."""
    out = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith("vidssl") and klass.__doc__:
            for p in parse(inspect.cleandoc(klass.__doc__)).params:
                text = " ".join((p.description or "").split())
                if text.startswith(("as ", "everything of")):
                    continue  # "backbone, ...: as VideoSSLMethod": the base class says more
                for name in re.split(r",\s*", p.arg_name):
                    out.setdefault(name.strip(), text)
    return out


def _parameters(cls):
    """``(name, default)`` of every argument a config can set: the class's and, through
    ``**kwargs``, its vidssl parents' (as jsonargparse follows them)."""
    out = {}
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__ or not klass.__module__.startswith("vidssl"):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def _group_rows(cls, name):
    """One row per field of group ``name`` with the method's default (``settings_defaults``)."""
    defaults = cls.settings_defaults(name)
    fields = {p.arg_name: " ".join((p.description or "").split())
              for p in parse(inspect.cleandoc(type(defaults).__doc__)).params}
    rows = []
    for field in dataclasses.fields(defaults):
        text = fields.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{name}.{field.name}` | {_fmt(getattr(defaults, field.name))} | {text} |")
    return rows


def _fmt(value):
    if value is inspect.Parameter.empty:
        return "**required**"
    return f"`{value!r}`"


def main():
    print("# Config reference\n")
    print("Every argument a `vidssl fit` config can set, with its default, generated from the")
    print("signatures and docstrings by `python examples/make_config_reference.py`. A config")
    print("names a class by `class_path` and sets arguments under `init_args`; a method's")
    print("head, optimiser and EMA settings are groups (`optim: {lr: 0.1}`; on the command line")
    print("`--model.init_args.optim.lr 0.1`) whose fields not set keep the method's defaults,")
    print("listed below;")
    print("`vidssl fit --config FILE --print_config` prints the resolved config. The Trainer's")
    print("arguments are Lightning's (`trainer:`; see the Lightning documentation).\n")
    print("```yaml\nmodel:\n  class_path: vidssl.methods.SimCLR\n  init_args:\n"
          "    backbone: r3d_18\ndata:\n  class_path: vidssl.data.VideoDataModule\n"
          "  init_args:\n    train: data/UCF101\ntrainer:\n  max_epochs: 200\n```\n")
    for title, classes in SECTIONS:
        print(f"## {title}\n")
        for cls in classes:
            path = f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
            if cls.__module__.startswith("vidssl.evaluation"):
                path = f"{cls.__module__}.{cls.__name__}"
            summary = inspect.getdoc(cls).split("\n\n")[0].replace("\n", " ")
            print(f"### `{path}`\n\n{summary}\n")
            print("| argument | default | meaning |\n| --- | --- | --- |")
            docs = _docs(cls)
            for name, default in _parameters(cls).items():
                if dataclasses.is_dataclass(default) and hasattr(cls, "settings_defaults"):
                    print("\n".join(_group_rows(cls, name)))
                    continue
                text = docs.get(name, "").replace("|", "\\|")
                print(f"| `{name}` | {_fmt(default)} | {text} |")
            print()
    print("## Linked and checked arguments\n")
    print("- `data.init_args.views` is set from the model's `views` (not set in configs); it sets")
    print("  `num_views` and `repeat_anchor`, so leave those out too.")
    print("- MoCo's `queue_size` must be a multiple of `data.init_args.batch_size` x the number")
    print("  of processes, with `data.init_args.drop_last: true` (checked when training starts;")
    print("  ClusterContrast's queue takes any batch).")


if __name__ == "__main__":
    main()
