//! A GGUF file: memory-mapped, its header parsed and checked before any weight is read, so
//! that a wrong, broken or hostile file fails with a message naming the file and the fault.

mod header;
mod value;
mod vocab;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

pub use header::{
    Header, HeaderError, TensorInfo, MAX_ALIGNMENT, MAX_DIMS, MAX_METADATA, MAX_TENSORS,
};
pub use value::{ArrayRef, Value, ValueType};
pub use vocab::GgufVocab;

use crate::error::{Error, Result};
use crate::quant::{RawTensor, WeightBytes};

/// The file is faulted in this many bytes at a time, checking for an interrupt in between.
const PREFAULT_CHUNK: usize = 64 << 20;

/// A parsed GGUF header plus the memory-mapped file its tensors are read from in place.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<Mmap>,
}

impl GgufFile {
    /// Maps and checks the file; the weights' pages are read in before returning (so that
    /// loading, not the first token, pays for reading the file) unless `interrupt` is set
    /// meanwhile, which ends the load with `Error::Interrupted`.
    pub fn open(path: &Path, interrupt: &AtomicBool) -> Result<Self> {
        let file = Self::open_header(path)?;
        prefault(&file.map, file.header.data_offset, interrupt).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if interrupt.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        Ok(file)
    }

    /// Maps and checks the file without reading the weights in: for its metadata alone.
    pub fn open_header(path: &Path) -> Result<Self> {
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            return Err(Error::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_dir() {
            return Err(Error::InvalidGguf {
                path: path.to_path_buf(),
                detail: "it is a directory; pass the .gguf file inside it".into(),
            });
        }
        // A pipe or a device would block the open or the read, or never end.
        if !path.is_file() {
            return Err(Error::InvalidGguf {
                path: path.to_path_buf(),
                detail: "it is not a regular file (a pipe, socket or device?); pass a .gguf file"
                    .into(),
            });
        }
        let mut file = File::open(path).map_err(io_err)?;
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut file, &mut magic).map_err(io_err)?;
        if &magic[..got] != b"GGUF" {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                found: describe_magic(&magic[..got]),
            });
        }
        // SAFETY: the usual caveat of mapping: the file must not be truncated while in use.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = Header::parse(&map).map_err(|e| header_error(path, e))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            map: Arc::new(map),
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    /// The items of a string-array metadata value (invalid UTF-8 replaced), if it has at
    /// most `max_items`: strings in memory take several times their bytes in the file.
    pub fn metadata_strings(&self, key: &str, max_items: usize) -> Option<Vec<String>> {
        match self.metadata(key)? {
            Value::Array(array) if array.item == ValueType::String && array.len <= max_items => {
                Some(
                    array
                        .strings(&self.map)
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// The items of a numeric-array metadata value as f64, if it has at most `max_items`.
    pub fn metadata_numbers(&self, key: &str, max_items: usize) -> Option<Vec<f64>> {
        match self.metadata(key)? {
            Value::Array(array) if array.item.fixed_size().is_some() && array.len <= max_items => {
                Some(array.numbers(&self.map).collect())
            }
            _ => None,
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(name)
    }

    /// One tensor's type, shape and bytes (a view of the mapping; nothing is copied).
    pub fn tensor(&self, name: &str) -> Result<RawTensor> {
        let Some(info) = self.header.tensors.get(name) else {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            });
        };
        // In bounds and of the right size for its shape: both checked by the header parse.
        RawTensor::new(
            info.dtype,
            info.dims.clone(),
            WeightBytes::mapped(Arc::clone(&self.map), info.bytes.clone()),
        )
        .map_err(|detail| Error::InvalidTensor {
            name: name.to_string(),
            detail,
        })
    }
}

/// Reads the tensor data's pages in, a chunk at a time, until done or interrupted.
fn prefault(map: &Mmap, from: usize, interrupt: &AtomicBool) -> std::io::Result<()> {
    let mut start = from.min(map.len());
    while start < map.len() && !interrupt.load(Ordering::Relaxed) {
        let len = PREFAULT_CHUNK.min(map.len() - start);
        #[cfg(target_os = "linux")]
        let populated = map
            .advise_range(memmap2::Advice::PopulateRead, start, len)
            .is_ok();
        #[cfg(not(target_os = "linux"))]
        let populated = false;
        if !populated {
            // Older kernels and other systems: touch one byte per page.
            let chunk = &map[start..start + len];
            let mut sum = 0u8;
            for page in chunk.iter().step_by(4096) {
                sum = sum.wrapping_add(*page);
            }
            std::hint::black_box(sum);
        }
        start += len;
    }
    Ok(())
}

fn header_error(path: &Path, err: HeaderError) -> Error {
    let path = path.to_path_buf();
    match err {
        HeaderError::Truncated(detail) => Error::Truncated { path, detail },
        HeaderError::Invalid(detail) => Error::InvalidGguf { path, detail },
        HeaderError::UnsupportedType { tensor, code } => Error::UnsupportedTensorType {
            path,
            name: tensor,
            dtype: header::ggml_type_name(code)
                .map(|n| format!("{n} (ggml type {code})"))
                .unwrap_or_else(|| format!("ggml type {code}")),
        },
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn describe_magic(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".into();
    }
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        format!("\"{}\"", String::from_utf8_lossy(bytes))
    } else {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

#[cfg(test)]
mod tests;
