"""The README says what the code does: its flags table is train.pretrain's parser, its links lead to files."""
import re
import shlex
from pathlib import Path

from train.pretrain import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def flag_rows() -> dict[str, str]:
    """{flag: its default cell} from the README's flags table; a row of several flags shares a cell per flag."""
    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"--[a-z]", cells[0]):
            continue
        flags = [f for group in cells[0].split(", ") for f in group.split(" / ")]
        defaults = cells[1].split(", ")
        for i, flag in enumerate(flags):
            rows[flag] = defaults[i] if len(defaults) == len(flags) else cells[1]
    return rows


def test_the_flags_table_lists_every_flag_with_its_default():
    rows = flag_rows()
    parser_flags = {}
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                parser_flags[flag] = action.default
    hidden = {"--fp8-emulate"}  # for tests only
    assert set(rows) == set(parser_flags) - hidden
    for flag, default in parser_flags.items():
        if isinstance(default, bool) or default is None or flag in hidden:
            continue  # on/off and derived defaults are words in the table
        cell = rows[flag].strip('"')
        if isinstance(default, (int, float)):
            assert float(cell) == default, (flag, cell, default)
        else:
            assert cell == default, (flag, cell, default)


def test_links_lead_to_files():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_the_first_commands_flags_are_train_pretrains():
    """The README's first command (install, dataset, tokenizer, a tiny run) passes flags the parsers take."""
    from train import sample
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = {c.split(" -m ")[1].split()[0]: c.split() for c in block.replace("\n", " ").split("&&") if " -m " in c}
    assert {"train.dataset", "train.tokenizer", "train.pretrain"} <= set(commands), commands
    args = build_parser().parse_args(commands["train.pretrain"][3:])
    assert args.dataset == "pystdlib" and args.num_iterations > 0
    sample_line = next(line for line in README.splitlines() if line.startswith("python -m train.sample"))
    sample.build_parser().parse_args(shlex.split(sample_line)[3:])
