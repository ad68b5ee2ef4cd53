//! Opening a GGUF file and checking it before any weight is read, so that a wrong or broken
//! file fails with a message naming the file and the fault instead of a Candle error later.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::{Mmap, MmapOptions};

use crate::error::{candle_message, Error, Result};
use crate::quant::{RawTensor, WeightBytes};

/// A parsed GGUF header plus the memory-mapped file its tensors are read from in place.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
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
        let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
        let file_size = reader.seek(SeekFrom::End(0)).map_err(io_err)?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;

        let mut magic = [0u8; 4];
        let got = read_up_to(&mut reader, &mut magic).map_err(io_err)?;
        if &magic[..got] != b"GGUF" {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                found: describe_magic(&magic[..got]),
            });
        }
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;

        let content = Content::read(&mut reader).map_err(|e| classify_read_error(path, e))?;
        // Weights are used where they lie in the page cache, not copied. `populate` faults
        // the pages in now, so loading (not the first token) pays for reading the file.
        // SAFETY: the usual caveat of mapping: the file must not be truncated while in use.
        let map = unsafe { MmapOptions::new().populate().map(reader.get_ref()) }.map_err(io_err)?;
        let file = GgufFile {
            path: path.to_path_buf(),
            content,
            map: Arc::new(map),
        };
        file.check_tensor_extents(file_size)?;
        Ok(file)
    }

    /// Every tensor's bytes must lie inside the file: a cut-off download fails here, at once.
    fn check_tensor_extents(&self, file_size: u64) -> Result<()> {
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::InvalidGguf {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor '{name}' has {elems} elements, not a multiple of the {block}-element blocks of {:?}",
                        info.ggml_dtype
                    ),
                });
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = self
                .content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(Error::Truncated {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor '{name}' ends at byte {end}, but the file has only {file_size} bytes"
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// One tensor's type, shape and bytes (a view of the mapping; nothing is copied).
    pub fn tensor(&self, name: &str) -> Result<RawTensor> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            });
        };
        // In bounds: `check_tensor_extents` has seen every tensor end inside the file.
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let len =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        Ok(RawTensor {
            dtype: info.ggml_dtype,
            dims: info.shape.dims().to_vec(),
            bytes: WeightBytes::mapped(Arc::clone(&self.map), start..start + len),
        })
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

/// Names of the ggml tensor types Candle does not load, as llama.cpp numbers them.
fn ggml_type_name(code: u32) -> Option<&'static str> {
    Some(match code {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

fn classify_read_error(path: &Path, err: candle_core::Error) -> Error {
    let message = candle_message(&err);
    if let Some(code) = message
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|rest| rest.trim().parse::<u32>().ok())
    {
        let dtype = ggml_type_name(code)
            .map(|n| format!("{n} (ggml type {code})"))
            .unwrap_or_else(|| format!("ggml type {code}"));
        let name = tensor_with_type_code(path, code).unwrap_or_else(|| "?".into());
        return Error::UnsupportedTensorType {
            path: path.to_path_buf(),
            name,
            dtype,
        };
    }
    let is_eof = matches!(&err, candle_core::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
        || message.contains("remaining")
        || message.contains("failed to fill whole buffer");
    if is_eof {
        Error::Truncated {
            path: path.to_path_buf(),
            detail: format!("its header is cut off ({message})"),
        }
    } else {
        Error::InvalidGguf {
            path: path.to_path_buf(),
            detail: message,
        }
    }
}

/// Candle's header reader stops at the first tensor type it does not know without naming the
/// tensor; walk the header ourselves to find that tensor's name for the message.
fn tensor_with_type_code(path: &Path, code: u32) -> Option<String> {
    let mut r = BufReader::new(File::open(path).ok()?);
    let mut u32b = [0u8; 4];
    let mut u64b = [0u8; 8];
    let mut read_u32 = |r: &mut BufReader<File>| -> Option<u32> {
        r.read_exact(&mut u32b).ok()?;
        Some(u32::from_le_bytes(u32b))
    };
    let _magic = read_u32(&mut r)?;
    let version = read_u32(&mut r)?;
    if version < 2 {
        return None;
    }
    let mut read_u64 = |r: &mut BufReader<File>| -> Option<u64> {
        r.read_exact(&mut u64b).ok()?;
        Some(u64::from_le_bytes(u64b))
    };
    let n_tensors = read_u64(&mut r)?;
    let n_kv = read_u64(&mut r)?;
    for _ in 0..n_kv {
        skip_string(&mut r)?;
        let vtype = read_u32(&mut r)?;
        skip_value(&mut r, vtype, 0)?;
    }
    for _ in 0..n_tensors {
        let name = read_string(&mut r)?;
        let n_dims = read_u32(&mut r)?;
        r.seek_relative(8 * i64::from(n_dims)).ok()?;
        let dtype = read_u32(&mut r)?;
        let _offset = read_u64(&mut r)?;
        if dtype == code {
            return Some(name);
        }
    }
    None
}

fn read_string(r: &mut BufReader<File>) -> Option<String> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 20 {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn skip_string(r: &mut BufReader<File>) -> Option<()> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).ok()?;
    r.seek_relative(i64::try_from(u64::from_le_bytes(len)).ok()?)
        .ok()
}

/// Skips one metadata value of GGUF value type `vtype` (v2/v3 layout).
fn skip_value(r: &mut BufReader<File>, vtype: u32, depth: u32) -> Option<()> {
    let fixed = |t: u32| -> Option<i64> {
        Some(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    };
    match vtype {
        8 => skip_string(r),
        9 => {
            if depth > 2 {
                return None;
            }
            let mut b4 = [0u8; 4];
            r.read_exact(&mut b4).ok()?;
            let item = u32::from_le_bytes(b4);
            let mut b8 = [0u8; 8];
            r.read_exact(&mut b8).ok()?;
            let n = u64::from_le_bytes(b8);
            match fixed(item) {
                Some(size) => r
                    .seek_relative(size.checked_mul(i64::try_from(n).ok()?)?)
                    .ok(),
                None => (0..n).try_for_each(|_| skip_value(r, item, depth + 1)),
            }
        }
        t => r.seek_relative(fixed(t)?).ok(),
    }
}
