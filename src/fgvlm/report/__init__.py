"""The report: the ablation table and its renderings (``tables``), factor effects with paired
intervals (``effects``), Altair figures (``figures``) and the file-level aggregation that ties
them together (``aggregate``, also behind ``fgvlm aggregate``).
"""
