"""Generate the API reference at build time: one page per module found under pipeline/.

Run by mkdocs-gen-files (see mkdocs.yml). Nothing here names a module, so the reference follows
whatever package layout pipeline/ has when the docs are built; the nav comes from the
generated reference/SUMMARY.md through mkdocs-literate-nav (the recipe of mkdocstrings' docs).
"""

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline"

nav = mkdocs_gen_files.Nav()
for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    module_path = path.relative_to(ROOT).with_suffix("")
    doc_path = path.relative_to(ROOT).with_suffix(".md")
    parts = tuple(module_path.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        doc_path = doc_path.with_name("index.md")
    elif parts[-1] == "__main__" or parts[-1].startswith("_"):
        continue
    if not (path.parent / "__init__.py").exists():
        continue  # a folder that is not a package (data files, scripts)
    nav[parts] = doc_path.as_posix()
    full_doc_path = Path("reference", doc_path)
    with mkdocs_gen_files.open(full_doc_path, "w") as fd:
        fd.write(f"::: {'.'.join(parts)}\n")
    mkdocs_gen_files.set_edit_path(full_doc_path, path.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as nav_file:
    nav_file.writelines(nav.build_literate_nav())
