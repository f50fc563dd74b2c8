"""Command line of nisf_monai (``nisf-monai COMMAND --help``): the package's tools that are not bundle runs."""

from __future__ import annotations

import fire

from nisf_monai.data.builder import build_datalist
from nisf_monai.data.synthetic import generate_cohort

COMMANDS = {"synthetic": generate_cohort, "datalist": build_datalist}


def main() -> None:
    fire.Fire(COMMANDS, name="nisf-monai")


if __name__ == "__main__":
    main()
