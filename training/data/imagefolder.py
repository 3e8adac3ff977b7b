"""A folder per class, as most image-level labels come (torchvision's ImageFolder):

    cat/  IMG_0001.jpg ...   (subfolders allowed)
    dog/  ...

or split already, ``train/<class>/...`` beside ``test/<class>/...`` (or ``val/``). A photo's
one label is the class folder it is in; the classes are the folders' names, sorted (as
ImageFolder numbers them). Unsplit, one photo in five is test, by a hash of its path under
the root (``folder.default_split``: adding photos moves none of the others). No masks: the
classifier, pseudo-masks and segmenter train, and evaluation scores the classifier only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from training.data.base import DataLayoutError, Layout, Sample
from training.data.folder import default_split
from wsss.served.images import IMAGE_SUFFIXES

SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # the first found is read


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _photos(folder: Path) -> Iterator[Path]:
    """The photos under ``folder``, at any depth, by their names' suffixes, as the walk
    finds them; hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``) left out."""
    return (
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(p.startswith(".") for p in path.relative_to(folder).parts)
        and path.is_file()
    )


class ImageFolderLayout(Layout):
    title = "a folder per class"
    tasks = ("pets",)  # one label a photo: the folder it is in

    def _split_roots(self, root: Path) -> dict[str, Path] | None:
        """``train`` and ``test`` folders where the root holds only split folders (train/
        and test/ or val/), else None: the root's folders are the classes."""
        if not root.is_dir():
            return None
        folders = {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}
        if "train" not in folders or not folders & {"test", "val"}:
            return None
        if folders - {"train", "test", "val"}:
            return None  # train/ beside cat/: a class called train
        return {
            split: root / next(n for n in names if n in folders)
            for split, names in SPLIT_FOLDERS.items()
        }

    def _class_folders(self, root: Path) -> list[Path]:
        if not root.is_dir():
            raise DataLayoutError(f"{root} is missing: expected a folder per class")
        roots = self._split_roots(root)
        tops = list(roots.values()) if roots else [root]
        return [p for top in tops for p in sorted(top.iterdir()) if p.is_dir() and _visible(p)]

    def class_names(self, root: Path) -> list[str]:
        names = sorted({p.name for p in self._class_folders(root) if next(_photos(p), None)})
        if not names:
            raise DataLayoutError(
                f"{root}: no folder of photos ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                "data.layout=imagefolder reads one folder per class, cat/*.jpg, dog/*.jpg"
            )
        loose = [
            p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if loose:  # a photo beside the class folders has no label
            raise DataLayoutError(
                f"{root}: {len(loose)} photo(s) beside the class folders ({loose[0]}, ...): "
                "each photo's class is the folder it is in; move them into one"
            )
        return names

    def source(self, root: Path, split: str) -> str:
        roots = self._split_roots(root)
        if roots:
            return f"{roots[split]} (a folder per class)"
        return f"{root} (a folder per class, the {split} photos by a hash of their paths)"

    def samples(self, root: Path, split: str) -> list[Sample]:
        index = {n: i for i, n in enumerate(self.class_names(root))}
        roots = self._split_roots(root)
        top = roots[split] if roots else root
        out, seen = [], {}
        for folder in sorted(top.iterdir()):
            if not (folder.is_dir() and _visible(folder) and folder.name in index):
                continue
            for path in sorted(_photos(folder)):
                relative = path.relative_to(top).as_posix()
                if roots is None and default_split(relative) != split:
                    continue
                name = Path(relative).with_suffix("").as_posix()  # its outputs' name
                if name in seen:
                    raise DataLayoutError(
                        f"{seen[name]} and {path} share the name {name} (one set of "
                        "outputs): rename one"
                    )
                seen[name] = path
                out.append(Sample(name, path, None, (index[folder.name],), self.name))
        return out
