"""The runner side of flame: the process a backend boots, which serves its parent's calls.

``_main`` boots the app and dials home, ``_runtime`` serves the connection and is the
terminator (deadlines, links, idle shutdown, single use, drain), ``_executor`` runs the work.
"""
