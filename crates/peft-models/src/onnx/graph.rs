//! The parts of an ONNX model (`onnx.proto`, IR version 3 and later) that reading weights out of
//! a graph needs: the graph's nodes (name, operator, inputs, outputs, tensor/number attributes)
//! and its initializers (named constant tensors), borrowing the file's bytes.

use std::collections::HashMap;

use super::wire::{push_floats, push_ints, Fields, Value};
use super::Res;

/// ONNX `TensorProto.DataType` values read here.
const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
const DOUBLE: i32 = 11;

/// A tensor stored in the graph (an initializer, or a `Constant` node's `value`).
#[derive(Debug, Default)]
pub(crate) struct TensorData<'a> {
    /// Its name (empty for a `Constant` node's value).
    pub name: &'a str,
    /// Its shape.
    pub dims: Vec<i64>,
    data_type: i32,
    raw: Option<&'a [u8]>,
    floats: Vec<f32>,
    ints: Vec<i64>,
    external: bool,
}

impl<'a> TensorData<'a> {
    fn parse(msg: &'a [u8]) -> Res<Self> {
        let mut t = TensorData::default();
        let mut f = Fields::new(msg);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => push_ints(v, "TensorProto.dims", &mut t.dims)?,
                2 => t.data_type = v.varint("TensorProto.data_type")? as i32,
                4 => push_floats(v, "TensorProto.float_data", &mut t.floats)?,
                5 | 7 => push_ints(v, "TensorProto.int_data", &mut t.ints)?,
                8 => t.name = v.text("TensorProto.name")?,
                9 => t.raw = Some(v.bytes("TensorProto.raw_data")?),
                13 => t.external = true,
                14 => t.external |= v.varint("TensorProto.data_location")? == 1,
                _ => {}
            }
        }
        Ok(t)
    }

    fn label(&self) -> String {
        if self.name.is_empty() {
            "a constant".into()
        } else {
            format!("tensor `{}`", self.name)
        }
    }

    /// The number of elements its shape holds.
    pub(crate) fn numel(&self) -> Res<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| {
            usize::try_from(d)
                .ok()
                .and_then(|d| n.checked_mul(d))
                .ok_or_else(|| format!("{}: invalid shape {:?}", self.label(), self.dims))
        })
    }

    /// The shape as sizes.
    pub(crate) fn shape(&self) -> Res<Vec<usize>> {
        self.numel()?;
        Ok(self.dims.iter().map(|&d| d as usize).collect())
    }

    fn check_stored(&self) -> Res<()> {
        if self.external {
            return Err(format!(
                "{}: its data is stored outside the .onnx file (external data), which is not \
                 supported; save the model with its weights inside",
                self.label()
            ));
        }
        Ok(())
    }

    /// `raw` as little-endian values of `N` bytes each (as many as the shape holds), through `f`.
    fn raw_values<T, const N: usize>(
        &self,
        raw: &[u8],
        width: &str,
        f: impl Fn([u8; N]) -> T,
    ) -> Res<Vec<T>> {
        if raw.len() != self.numel()?.saturating_mul(N) {
            return Err(format!(
                "{}: {} bytes of data for shape {:?} of {width}",
                self.label(),
                raw.len(),
                self.dims
            ));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("N bytes")))
            .collect())
    }

    /// `values` (from the typed repeated fields) when there are as many as the shape holds.
    fn counted<T: Clone>(&self, values: &[T]) -> Res<Vec<T>> {
        if values.len() != self.numel()? {
            return Err(format!(
                "{}: {} values for shape {:?}",
                self.label(),
                values.len(),
                self.dims
            ));
        }
        Ok(values.to_vec())
    }

    fn wrong_type<T>(&self, expected: &str) -> Res<T> {
        Err(format!(
            "{}: data type {} where {expected} was expected",
            self.label(),
            self.data_type
        ))
    }

    /// The values of a float32 (or float64) tensor, in row-major order.
    pub(crate) fn to_f32(&self) -> Res<Vec<f32>> {
        self.check_stored()?;
        match (self.data_type, self.raw) {
            (FLOAT, Some(raw)) => self.raw_values(raw, "float32", f32::from_le_bytes),
            (FLOAT, None) => self.counted(&self.floats),
            (DOUBLE, Some(raw)) => {
                self.raw_values(raw, "float64", |b| f64::from_le_bytes(b) as f32)
            }
            _ => self.wrong_type("float32"),
        }
    }

    /// The values of an int64 (or int32) tensor, in row-major order.
    pub(crate) fn to_i64(&self) -> Res<Vec<i64>> {
        self.check_stored()?;
        match (self.data_type, self.raw) {
            (INT64, Some(raw)) => self.raw_values(raw, "int64", i64::from_le_bytes),
            (INT32, Some(raw)) => {
                self.raw_values(raw, "int32", |b| i64::from(i32::from_le_bytes(b)))
            }
            (INT64 | INT32, None) => self.counted(&self.ints),
            _ => self.wrong_type("an integer"),
        }
    }
}

/// An attribute of a node: a tensor or a float (others are not needed and skipped).
#[derive(Debug)]
pub(crate) enum Attribute<'a> {
    Tensor(TensorData<'a>),
    Float(f32),
    Other,
}

/// A node of the graph.
#[derive(Debug, Default)]
pub(crate) struct Node<'a> {
    pub name: &'a str,
    pub op_type: &'a str,
    pub inputs: Vec<&'a str>,
    pub outputs: Vec<&'a str>,
    pub attributes: Vec<(&'a str, Attribute<'a>)>,
}

impl<'a> Node<'a> {
    fn parse(msg: &'a [u8]) -> Res<Self> {
        let mut n = Node::default();
        let mut f = Fields::new(msg);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => n.inputs.push(v.text("NodeProto.input")?),
                2 => n.outputs.push(v.text("NodeProto.output")?),
                3 => n.name = v.text("NodeProto.name")?,
                4 => n.op_type = v.text("NodeProto.op_type")?,
                5 => n
                    .attributes
                    .push(parse_attribute(v.bytes("NodeProto.attribute")?)?),
                _ => {}
            }
        }
        Ok(n)
    }

    /// The attribute `name`, if the node has it.
    pub(crate) fn attribute(&self, name: &str) -> Option<&Attribute<'a>> {
        self.attributes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a)
    }
}

fn parse_attribute(msg: &[u8]) -> Res<(&str, Attribute<'_>)> {
    let (mut name, mut attr) = ("", Attribute::Other);
    let mut f = Fields::new(msg);
    while let Some((field, v)) = f.next_field()? {
        match (field, v) {
            (1, v) => name = v.text("AttributeProto.name")?,
            (2, Value::Fixed32(bits)) => attr = Attribute::Float(f32::from_bits(bits)),
            (5, v) => attr = Attribute::Tensor(TensorData::parse(v.bytes("AttributeProto.t")?)?),
            _ => {}
        }
    }
    Ok((name, attr))
}

/// The main graph of an ONNX model.
pub(crate) struct Graph<'a> {
    /// Nodes in the file's (topological) order.
    pub nodes: Vec<Node<'a>>,
    /// Initializers by name.
    pub initializers: HashMap<&'a str, TensorData<'a>>,
    producers: HashMap<&'a str, usize>,
}

impl<'a> Graph<'a> {
    /// Parses a serialized `ModelProto`.
    pub(crate) fn parse_model(data: &'a [u8]) -> Res<Self> {
        let mut graph = None;
        let mut f = Fields::new(data);
        while let Some((field, v)) = f.next_field()? {
            if field == 7 {
                graph = Some(v.bytes("ModelProto.graph")?);
            }
        }
        let graph = graph.ok_or("no graph (not an ONNX model?)")?;
        let (mut nodes, mut initializers) = (Vec::new(), HashMap::new());
        let mut f = Fields::new(graph);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => nodes.push(Node::parse(v.bytes("GraphProto.node")?)?),
                5 => {
                    let t = TensorData::parse(v.bytes("GraphProto.initializer")?)?;
                    initializers.insert(t.name, t);
                }
                _ => {}
            }
        }
        let producers = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (*o, i)))
            .collect();
        Ok(Self {
            nodes,
            initializers,
            producers,
        })
    }

    /// The node whose output is `value`, if a node makes it.
    pub(crate) fn producer(&self, value: &str) -> Option<&Node<'a>> {
        self.producers.get(value).map(|&i| &self.nodes[i])
    }

    /// The nodes that take `value` as an input.
    pub(crate) fn consumers<'g>(&'g self, value: &'g str) -> impl Iterator<Item = &'g Node<'a>> {
        self.nodes.iter().filter(move |n| n.inputs.contains(&value))
    }

    /// The constant tensor `value` is: an initializer, or the output of a `Constant` node.
    pub(crate) fn constant(&self, value: &str) -> Option<&TensorData<'a>> {
        if let Some(t) = self.initializers.get(value) {
            return Some(t);
        }
        let node = self.producer(value)?;
        if node.op_type != "Constant" {
            return None;
        }
        match node.attribute("value") {
            Some(Attribute::Tensor(t)) => Some(t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn int_field(n: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(n) << 3, out);
        varint(v, out);
    }

    fn bytes_field(n: u32, b: &[u8], out: &mut Vec<u8>) {
        varint((u64::from(n) << 3) | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    /// A TensorProto named `t` of `dims` and `data_type`, with `raw` as raw_data if given.
    fn tensor(dims: &[u64], data_type: u64, raw: Option<&[u8]>, extra: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for &d in dims {
            int_field(1, d, &mut m);
        }
        int_field(2, data_type, &mut m);
        bytes_field(8, b"t", &mut m);
        if let Some(raw) = raw {
            bytes_field(9, raw, &mut m);
        }
        m.extend_from_slice(extra);
        m
    }

    #[test]
    fn tensors_decode_from_raw_and_typed_fields() {
        let raw: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let msg = tensor(&[2, 2], 1, Some(&raw), &[]);
        let t = TensorData::parse(&msg).unwrap();
        assert_eq!((t.name, t.shape().unwrap()), ("t", vec![2, 2]));
        assert_eq!(t.to_f32().unwrap(), [1.5, -2.0, 0.25, 8.0]);
        assert!(t.to_i64().unwrap_err().contains("data type 1"));
        // float_data, packed
        let mut extra = Vec::new();
        bytes_field(4, &raw[..8], &mut extra);
        let msg = tensor(&[2], 1, None, &extra);
        assert_eq!(
            TensorData::parse(&msg).unwrap().to_f32().unwrap(),
            [1.5, -2.0]
        );
        // int32 raw data widened; int64_data
        let ints: Vec<u8> = [-3i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let msg = tensor(&[2], 6, Some(&ints), &[]);
        assert_eq!(TensorData::parse(&msg).unwrap().to_i64().unwrap(), [-3, 7]);
        let mut extra = Vec::new();
        int_field(7, 42, &mut extra);
        let msg = tensor(&[1], 7, None, &extra);
        assert_eq!(TensorData::parse(&msg).unwrap().to_i64().unwrap(), [42]);
    }

    #[test]
    fn inconsistent_or_external_tensors_are_refused() {
        // Three floats' bytes for a 2×2 shape.
        let msg = tensor(&[2, 2], 1, Some(&[0u8; 12]), &[]);
        let err = TensorData::parse(&msg).unwrap().to_f32().unwrap_err();
        assert!(err.contains("12 bytes") && err.contains("[2, 2]"), "{err}");
        // A shape whose element count overflows.
        let msg = tensor(&[u64::MAX >> 2, u64::MAX >> 2], 1, Some(&[]), &[]);
        let err = TensorData::parse(&msg).unwrap().to_f32().unwrap_err();
        assert!(err.contains("invalid shape"), "{err}");
        // Data in an external file (data_location = EXTERNAL).
        let mut extra = Vec::new();
        int_field(14, 1, &mut extra);
        let err = TensorData::parse(&tensor(&[1], 1, None, &extra))
            .unwrap()
            .to_f32()
            .unwrap_err();
        assert!(err.contains("external data"), "{err}");
        // Too few typed values.
        let err = TensorData::parse(&tensor(&[3], 7, None, &[]))
            .unwrap()
            .to_i64()
            .unwrap_err();
        assert!(err.contains("0 values for shape [3]"), "{err}");
    }
}
