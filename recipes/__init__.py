"""Research recipes that live beside the package, not in it: how the shipped model was trained.

Run them from the repository root: `python -m recipes.shapes.recipe --out runs/shapes`.
"""
