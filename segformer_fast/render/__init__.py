"""Label maps as images, for the jobs and the service alike: dataset palettes and class names and the overlay
(``palettes``), the label PNG and the overlay PNG / JPEG written atomically (``images``).

Imports from the project: core.
"""
