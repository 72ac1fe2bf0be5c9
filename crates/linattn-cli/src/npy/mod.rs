//! NumPy .npy arrays of float32 or float64: reading with every claim of the header
//! checked against the file before anything is allocated, and writing through npyz.

mod header;

use crate::error::CliError;
use header::{Descr, Header};
use linattn::{ByteSize, Element, Tensor};
use npyz::WriterBuilder;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

/// The first bytes of every .npy file.
const MAGIC: &[u8] = b"\x93NUMPY";

/// Bytes decoded per read, so that reading never holds the raw file beside its values.
const CHUNK_BYTES: usize = 1 << 20;

/// The elements of an array in one of the two precisions linattn computes in.
pub enum Elements {
    /// float32 values.
    F32(Vec<f32>),
    /// float64 values.
    F64(Vec<f64>),
}

impl Elements {
    /// NumPy's name of the element type.
    pub fn dtype(&self) -> &'static str {
        match self {
            Elements::F32(_) => f32::NAME,
            Elements::F64(_) => f64::NAME,
        }
    }

    /// The values widened to f64 (exactly).
    pub fn into_f64(self) -> Vec<f64> {
        match self {
            Elements::F32(values) => values.into_iter().map(f64::from).collect(),
            Elements::F64(values) => values,
        }
    }
}

/// A precision linattn computes in, taken out of the [`Elements`] that were read.
pub trait Float: Element + npyz::AutoSerialize {
    /// The values of `elements` if they are of this type, else `elements` unchanged.
    fn take(elements: Elements) -> Result<Vec<Self>, Elements>;
}

impl Float for f32 {
    fn take(elements: Elements) -> Result<Vec<Self>, Elements> {
        match elements {
            Elements::F32(values) => Ok(values),
            other => Err(other),
        }
    }
}

impl Float for f64 {
    fn take(elements: Elements) -> Result<Vec<Self>, Elements> {
        match elements {
            Elements::F64(values) => Ok(values),
            other => Err(other),
        }
    }
}

/// A C-order array read from a .npy file.
pub struct Array {
    /// The file it came from, for messages.
    pub path: PathBuf,
    /// Extent of each dimension.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub elements: Elements,
}

impl Array {
    /// The shape as exactly `N` dimensions, or an error naming the array's `role` and the
    /// layout it must have.
    pub fn dims<const N: usize>(
        &self,
        role: &'static str,
        expected: &'static str,
    ) -> Result<[usize; N], CliError> {
        self.shape
            .as_slice()
            .try_into()
            .map_err(|_| CliError::WrongDimensions {
                path: self.path.clone(),
                shape: self.shape.clone(),
                role,
                expected,
            })
    }
}

/// Float width and byte order of the stored elements.
#[derive(Clone, Copy)]
enum Stored {
    F32 { big_endian: bool },
    F64 { big_endian: bool },
}

impl Stored {
    fn of_descr(descr: &str) -> Option<Self> {
        let (big_endian, code) = match descr.as_bytes() {
            [b'<', code @ ..] => (false, code),
            [b'>', code @ ..] => (true, code),
            [b'=', code @ ..] => (cfg!(target_endian = "big"), code),
            code => (cfg!(target_endian = "big"), code),
        };
        match code {
            b"f4" => Some(Stored::F32 { big_endian }),
            b"f8" => Some(Stored::F64 { big_endian }),
            _ => None,
        }
    }

    fn element_bytes(self) -> usize {
        match self {
            Stored::F32 { .. } => 4,
            Stored::F64 { .. } => 8,
        }
    }

    fn dtype(self) -> &'static str {
        match self {
            Stored::F32 { .. } => f32::NAME,
            Stored::F64 { .. } => f64::NAME,
        }
    }
}

/// NumPy's name for a type string, to make an "unsupported dtype" message plain:
/// `'<i4'` is int32, `'<f2'` float16.
fn numpy_name(descr: &str) -> Option<String> {
    let code = descr.trim_start_matches(['<', '>', '=', '|']);
    let (kind, size) = code.split_at_checked(1)?;
    let bits = size.parse::<u32>().ok()? * 8;
    let base = match kind {
        "f" => "float",
        "i" => "int",
        "u" => "uint",
        "c" => "complex",
        "b" => return Some("bool".into()),
        "S" | "U" => return Some("string".into()),
        _ => return None,
    };
    Some(format!("{base}{bits}"))
}

fn malformed(path: &Path, problem: String) -> CliError {
    CliError::MalformedNpy {
        path: path.to_owned(),
        problem,
    }
}

/// Reads a float32 or float64 array from `path`, in C order whatever order it was saved
/// in.
pub fn read(path: &Path) -> Result<Array, CliError> {
    let read_error = |source| CliError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let file_len = file.metadata().map_err(read_error)?.len();
    read_from(BufReader::new(file), file_len, path)
}

/// Reads an array from the bytes of a .npy file received whole (an upload); `name`
/// stands for the file in messages.
pub fn parse(bytes: &[u8], name: &str) -> Result<Array, CliError> {
    read_from(bytes, bytes.len() as u64, Path::new(name))
}

/// Reads an array from `reader`, which holds `file_len` bytes of .npy named `path`.
fn read_from(mut reader: impl Read, file_len: u64, path: &Path) -> Result<Array, CliError> {
    let read_error = |source| CliError::Read {
        path: path.to_owned(),
        source,
    };
    let (header, data_len) = read_header(&mut reader, file_len, path)?;
    let stored = stored_type(&header, path)?;
    let shape = checked_shape(&header, stored, data_len, path)?;
    let count = shape.iter().product();
    // NumPy stores a Fortran-ordered array (`a.T` of a C-ordered one, say) with its first
    // axis varying fastest; the values are put in C order as they are read.
    let fortran = header.fortran_order.then_some(shape.as_slice());
    let elements = match stored {
        Stored::F32 { big_endian } => Elements::F32(into_c_order(
            decode(
                &mut reader,
                count,
                if big_endian {
                    f32::from_be_bytes
                } else {
                    f32::from_le_bytes
                },
            )
            .map_err(read_error)?,
            fortran,
        )),
        Stored::F64 { big_endian } => Elements::F64(into_c_order(
            decode(
                &mut reader,
                count,
                if big_endian {
                    f64::from_be_bytes
                } else {
                    f64::from_le_bytes
                },
            )
            .map_err(read_error)?,
            fortran,
        )),
    };
    Ok(Array {
        path: path.to_owned(),
        shape,
        elements,
    })
}

/// Values in C order (the last axis varying fastest): as they are, or, where they were
/// stored in Fortran order (the first axis fastest) with `fortran`'s shape, rearranged by
/// walking the C-order index and stepping the Fortran offset with it.
fn into_c_order<T: Copy>(values: Vec<T>, fortran: Option<&[usize]>) -> Vec<T> {
    let Some(shape) = fortran.filter(|shape| shape.len() > 1) else {
        return values;
    };
    let mut strides = vec![1usize; shape.len()];
    for axis in 1..shape.len() {
        strides[axis] = strides[axis - 1] * shape[axis - 1];
    }
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0;
    let mut ordered = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        ordered.push(values[offset]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < shape[axis] {
                break;
            }
            offset -= strides[axis] * shape[axis];
            index[axis] = 0;
        }
    }
    ordered
}

/// The preamble and header, leaving `reader` at the data; returns the header and the
/// bytes of data the file holds after it.
fn read_header(
    reader: &mut impl Read,
    file_len: u64,
    path: &Path,
) -> Result<(Header, u64), CliError> {
    let read_error = |source| CliError::Read {
        path: path.to_owned(),
        source,
    };
    let mut preamble = [0u8; 8];
    if file_len < preamble.len() as u64 {
        return Err(malformed(
            path,
            format!("it is only {file_len} bytes long, too short for the .npy magic and version"),
        ));
    }
    reader.read_exact(&mut preamble).map_err(read_error)?;
    if !preamble.starts_with(MAGIC) {
        return Err(malformed(
            path,
            "bad magic: it does not start with \\x93NUMPY".into(),
        ));
    }
    let length_bytes = match (preamble[6], preamble[7]) {
        (1, 0) => 2,
        (2 | 3, 0) => 4,
        (major, minor) => {
            return Err(malformed(
                path,
                format!("unsupported .npy format version {major}.{minor}"),
            ));
        }
    };
    let mut length = [0u8; 4];
    reader
        .read_exact(&mut length[..length_bytes])
        .map_err(|_| malformed(path, "it ends inside the header length".into()))?;
    let header_len = u64::from(u32::from_le_bytes(length));
    let data_start = 8 + length_bytes as u64 + header_len;
    if data_start > file_len {
        return Err(malformed(
            path,
            format!(
                "the header claims {header_len} bytes but the file ends {} bytes after the preamble",
                file_len.saturating_sub(8 + length_bytes as u64)
            ),
        ));
    }
    // No larger than the file, which was just checked.
    let mut text = vec![0u8; header_len as usize];
    reader.read_exact(&mut text).map_err(read_error)?;
    let header = header::parse(&text)
        .map_err(|problem| malformed(path, format!("bad header: {problem}")))?;
    Ok((header, file_len - data_start))
}

/// The stored element type, if linattn reads it.
fn stored_type(header: &Header, path: &Path) -> Result<Stored, CliError> {
    let unsupported = |descr: String| CliError::UnsupportedDtype {
        path: path.to_owned(),
        descr,
    };
    let stored = match &header.descr {
        Descr::Plain(descr) => Stored::of_descr(descr).ok_or_else(|| {
            let name = numpy_name(descr).map_or(String::new(), |name| format!(" ({name})"));
            unsupported(format!("'{descr}'{name}"))
        })?,
        Descr::Structured => return Err(unsupported("of a structured array".into())),
    };
    Ok(stored)
}

/// The shape, once it is known to describe exactly the `data_len` bytes the file holds
/// and to fit in memory: checked before anything is allocated, so that a small file
/// claiming a huge shape fails at once.
fn checked_shape(
    header: &Header,
    stored: Stored,
    data_len: u64,
    path: &Path,
) -> Result<Vec<usize>, CliError> {
    let needs = |bytes: String| {
        format!(
            "shape {:?} of {} needs {bytes} bytes of data but the file holds {data_len}",
            header.shape,
            stored.dtype()
        )
    };
    let needed = header
        .shape
        .iter()
        .try_fold(stored.element_bytes() as u64, |acc, &dim| {
            acc.checked_mul(dim)
        });
    match needed {
        None => return Err(malformed(path, needs("more than 2^64".into()))),
        Some(needed) if needed > data_len => {
            return Err(malformed(
                path,
                format!("truncated: {}", needs(needed.to_string())),
            ));
        }
        Some(needed) if needed < data_len => {
            return Err(malformed(
                path,
                format!(
                    "{}, {} bytes too many",
                    needs(needed.to_string()),
                    data_len - needed
                ),
            ));
        }
        Some(_) => {}
    }
    let available = linattn::available_memory();
    if u128::from(data_len) > available {
        return Err(CliError::TooLarge {
            path: path.to_owned(),
            size: ByteSize(data_len.into()),
            available: ByteSize(available),
        });
    }
    header
        .shape
        .iter()
        .map(|&dim| usize::try_from(dim))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            malformed(
                path,
                format!(
                    "shape {:?} does not fit this platform's usize",
                    header.shape
                ),
            )
        })
}

/// `count` values of `N` bytes each, converted by `convert`.
fn decode<T, const N: usize>(
    reader: &mut impl Read,
    count: usize,
    convert: fn([u8; N]) -> T,
) -> io::Result<Vec<T>> {
    let mut values = Vec::with_capacity(count);
    let mut buffer = vec![0u8; CHUNK_BYTES.min(count * N)];
    while values.len() < count {
        let bytes = &mut buffer[..(count - values.len()).min(CHUNK_BYTES / N) * N];
        reader.read_exact(bytes)?;
        values.extend(bytes.chunks_exact(N).map(|chunk| {
            let mut element = [0u8; N];
            element.copy_from_slice(chunk);
            convert(element)
        }));
    }
    Ok(values)
}

/// Output files written all or none: each destination gets a temporary file beside it
/// when the outputs are declared (so a missing or read-only directory fails before any
/// work), and [`Outputs::commit`] renames them into place once every one is complete.
/// Until then no existing file is touched, and dropping uncommitted outputs removes the
/// temporary files.
pub struct Outputs {
    files: Vec<(PathBuf, tempfile::NamedTempFile)>,
}

impl Outputs {
    /// Temporary files for `destinations`; refuses a destination that names one of
    /// `inputs` or another destination (the same file by any path).
    pub fn create(destinations: &[PathBuf], inputs: &[&Path]) -> Result<Self, CliError> {
        let inputs: Vec<PathBuf> = inputs.iter().filter_map(|p| identity(p)).collect();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut files = Vec::new();
        for path in destinations {
            let write_error = |source| CliError::Write {
                path: path.clone(),
                source,
            };
            let directory = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let same = identity(path);
            if same.as_ref().is_some_and(|p| inputs.contains(p)) {
                return Err(CliError::Usage(format!(
                    "{} is also an input; write the output elsewhere",
                    path.display()
                )));
            }
            if same.as_ref().is_some_and(|p| seen.contains(p)) {
                return Err(CliError::Usage(format!(
                    "{} would be written twice",
                    path.display()
                )));
            }
            seen.extend(same);
            let file = tempfile::Builder::new()
                .prefix(".linattn-")
                .suffix(".npy.partial")
                .tempfile_in(directory)
                .map_err(write_error)?;
            files.push((path.clone(), file));
        }
        Ok(Self { files })
    }

    /// Writes `tensor` as the `index`-th destination's array, in its own precision.
    pub fn write<T: Float>(&mut self, index: usize, tensor: &Tensor<T>) -> Result<(), CliError> {
        self.write_array(index, &tensor.shape(), tensor.as_slice())
    }

    /// Writes `values`, row-major of `shape`, as the `index`-th destination's C-order
    /// array.
    pub fn write_array<T: npyz::AutoSerialize + Copy>(
        &mut self,
        index: usize,
        shape: &[usize],
        values: &[T],
    ) -> Result<(), CliError> {
        let (path, file) = &mut self.files[index];
        write_to(file.as_file_mut(), shape, values)
            .and_then(|()| file.as_file().sync_all())
            .map_err(|source| CliError::Write {
                path: path.clone(),
                source,
            })
    }

    /// Renames every temporary file to its destination.
    pub fn commit(self) -> Result<(), CliError> {
        for (path, file) in self.files {
            file.persist(&path).map_err(|e| CliError::Write {
                path: path.clone(),
                source: e.error,
            })?;
        }
        Ok(())
    }
}

/// Writes `values`, row-major of `shape`, to `out` as a C-order .npy array.
pub fn write_to<T: npyz::AutoSerialize + Copy>(
    out: impl io::Write,
    shape: &[usize],
    values: &[T],
) -> io::Result<()> {
    let shape: Vec<u64> = shape.iter().map(|&dim| dim as u64).collect();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::new(out))
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    // finish() flushes the buffer; dropping the writer would swallow a write error.
    writer.finish()
}

/// The file `path` names, whatever the path's spelling: its canonical form, or for a
/// file that does not exist yet its directory's canonical form and its name.
fn identity(path: &Path) -> Option<PathBuf> {
    if let Ok(canonical) = path.canonicalize() {
        return Some(canonical);
    }
    let name = path.file_name()?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    Some(directory.canonicalize().ok()?.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npy file of float32 `values`, given in the file's order, of `shape`, in Fortran
    /// or C order, as npyz writes it.
    fn file(fortran_order: bool, shape: &[usize], values: &[f32]) -> Vec<u8> {
        let shape: Vec<u64> = shape.iter().map(|&dim| dim as u64).collect();
        let order = match fortran_order {
            true => npyz::Order::Fortran,
            false => npyz::Order::C,
        };
        let mut bytes = Vec::new();
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .order(order)
            .writer(&mut bytes)
            .begin_nd()
            .unwrap();
        writer.extend(values.iter().copied()).unwrap();
        writer.finish().unwrap();
        bytes
    }

    fn values(array: Array) -> Vec<f32> {
        match array.elements {
            Elements::F32(values) => values,
            Elements::F64(_) => panic!("float32 was written"),
        }
    }

    #[test]
    fn fortran_order_is_read_into_c_order() {
        let shape = [2, 3, 4];
        let c_order: Vec<f32> = (0..24u8).map(f32::from).collect();
        // The same array with its first axis varying fastest, as NumPy saves
        // `np.asfortranarray(a)`.
        let mut fortran = Vec::new();
        for k in 0..4 {
            for j in 0..3 {
                for i in 0..2 {
                    fortran.push(c_order[(i * 3 + j) * 4 + k]);
                }
            }
        }
        let read = parse(&file(true, &shape, &fortran), "fortran.npy").unwrap();
        assert_eq!(read.shape, shape);
        assert_eq!(values(read), c_order);
        let read = parse(&file(false, &shape, &c_order), "c.npy").unwrap();
        assert_eq!(values(read), c_order);
        // One axis, or none, is the same in either order.
        let line = parse(&file(true, &[5], &c_order[..5]), "line.npy").unwrap();
        assert_eq!(values(line), &c_order[..5]);
        let empty = parse(&file(true, &[0, 3], &[]), "empty.npy").unwrap();
        assert!(values(empty).is_empty());
    }
}
