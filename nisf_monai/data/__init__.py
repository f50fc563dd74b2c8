from nisf_monai.data.datalist import case_name, list_images, load_datalist

__all__ = ["case_name", "list_images", "load_datalist"]
