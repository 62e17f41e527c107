"""Small, dependency-free utilities shared by every part of the codebase."""

from .util import EasyDict, construct_class_by_name, get_obj_by_name, make_cache_dir_path, open_url, parse_int_list

__all__ = ["EasyDict", "construct_class_by_name", "get_obj_by_name", "make_cache_dir_path", "open_url", "parse_int_list"]
