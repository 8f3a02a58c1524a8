"""The parts of ``textscf evaluate`` (the loop is :mod:`textscf.evaluate`, the command :mod:`textscf.evaluate_cli`).

- :mod:`~textscf.evaluation.pairs`: the pairs to register (:class:`PairCase`) and the lists they come from;
- :mod:`~textscf.evaluation.learn2reg`: the Learn2Reg 2020/2021 submission layout of the fields;
- :mod:`~textscf.evaluation.statistics`: per-region and per-pair rows and their summaries;
- :mod:`~textscf.evaluation.report`: CSV files, Markdown tables, ``summary.md`` and the Dice box plot;
- :mod:`~textscf.evaluation.partial`: the finished pairs of an unfinished evaluation, for ``--resume``.
"""
