"""The Train tab's dataset folder: its captions in an editable table (load, save) and uploads of images and
captions into it."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import GenerationError, PathError
from sdlora.ui.app.engine import user_errors
from sdlora.ui.app.settings import AppSettings, dataset_folder, resolve_inside


def _caption_images(folder: Path) -> dict[str, Path]:
    """{name relative to the dataset folder: image} of the images training reads there: the folder's own, or
    those of its kohya repeat subfolders (`10_name/`) when it has them (the dataset reader's rule)."""
    from sdlora.data.dataset import expand_folder, is_training_image

    images = {}
    for sub, _, _ in expand_folder(folder, 1):
        for path in sorted(p for p in sub.iterdir() if is_training_image(p)):
            images[path.relative_to(folder).as_posix()] = path
    return images


def _read_caption(path: Path) -> str:
    """A sidecar caption's text; "" when missing or not UTF-8 (shown empty, and left alone unless edited)."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def load_captions(settings: AppSettings, dataset) -> list[list[str]]:
    """"Load captions": [image file, caption] for every image training reads in the dataset folder, those of
    kohya repeat subfolders as `10_name/image.png` (its .txt sidecar; missing or non-UTF-8 captions are empty)."""
    with user_errors():
        folder = dataset_folder(settings, dataset)
        rows = [[name, _read_caption(p.with_suffix(".txt"))] for name, p in _caption_images(folder).items()]
    if not rows:
        import gradio as gr

        gr.Warning(f"no images in {dataset}")
    return rows


def save_captions(settings: AppSettings, dataset, table) -> str:
    """"Save captions": write each changed caption to its image's .txt sidecar (atomically). Only the images "Load
    captions" lists get captions (a name that is none of them refuses the whole table). Returns an info line."""
    from sdlora.atomic import write_text

    with user_errors():
        folder = dataset_folder(settings, dataset)
        if hasattr(table, "values") and hasattr(table, "columns"):  # a pandas DataFrame
            table = table.values.tolist()
        images = _caption_images(folder)
        writes = []
        for row in table or []:
            if not row or not any(str(v or "").strip() for v in row):
                continue  # an empty row the table editor added
            file, caption = str(row[0] or ""), str(row[1] if len(row) > 1 and row[1] is not None else "")
            if file not in images:
                raise PathError(f"{file!r}: not an image in {dataset}; only the images listed by Load captions get "
                                "captions")
            sidecar = resolve_inside(folder, Path(file).with_suffix(".txt").as_posix())
            caption = caption.strip()
            if caption != _read_caption(sidecar):
                writes.append((sidecar, caption))
        for sidecar, caption in writes:
            write_text(sidecar, caption + "\n" if caption else "")
    return f"saved {len(writes)} changed caption(s) in {folder}"


MAX_UPLOAD_BYTES = 64 * 2**20  # per file: far above any training image, far below filling a disk by accident


def add_uploads(settings: AppSettings, dataset, files) -> tuple[list[list[str]], str]:
    """"Add to the folder": copy uploaded images and .txt captions into the dataset folder (created inside
    data_dir). Every file is checked first — a training image type that decodes, or UTF-8 text, at most
    MAX_UPLOAD_BYTES, no existing file of that name — so a bad upload writes nothing. Returns the caption table of
    the folder and an info line."""
    from PIL import Image

    from sdlora.atomic import write_bytes
    from sdlora.data.dataset import IMAGE_EXTENSIONS

    with user_errors():
        folder = resolve_inside(settings.data_dir, (dataset or "").strip())
        uploads = [Path(f if isinstance(f, str) else f.name) for f in files or []]
        if not uploads:
            raise GenerationError("choose image files (and their .txt captions) to upload first")
        for src in uploads:
            kind = src.suffix.lower()
            if kind not in (*IMAGE_EXTENSIONS, ".txt"):
                raise PathError(f"{src.name}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or a .txt caption")
            if src.stat().st_size > MAX_UPLOAD_BYTES:
                raise PathError(f"{src.name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            if resolve_inside(folder, src.name).exists():
                raise PathError(f"{src.name} is already in {dataset}; nothing was uploaded")
            try:
                if kind == ".txt":
                    src.read_bytes().decode("utf-8-sig")
                else:
                    with Image.open(src) as image:
                        image.verify()
            except Exception as e:  # PIL reports damage as OSError, SyntaxError, struct.error, ...
                raise PathError(f"{src.name}: unreadable ({type(e).__name__}); nothing was uploaded") from None
        folder.mkdir(parents=True, exist_ok=True)
        for src in uploads:
            write_bytes(folder / src.name, src.read_bytes())
    return load_captions(settings, dataset), f"added {len(uploads)} file(s) to {folder}"
