//! The gRPC codec of the generated service and client: prost's, except that a
//! message that does not decode is answered `INVALID_ARGUMENT` naming the field,
//! not `INTERNAL`. Such a message is the sender's doing (a string that is not
//! UTF-8, a value nested deeper than protobuf decodes), so the status must say so.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::limits::MAX_DEPTH;

/// Named by `build.rs` (`codec_path`) for every method.
#[derive(Debug, Clone)]
pub struct ArpcpCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for ArpcpCodec<T, U> {
    fn default() -> Self {
        ArpcpCodec {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ArpcpCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ArpcpDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ArpcpDecoder {
            _message: PhantomData,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ArpcpDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ArpcpDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's error names the message and field path ("SubmitRequest.procedure:
        // invalid string value: data is not UTF-8 encoded").
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "the message does not decode: {} (strings must be UTF-8, and values \
                 may nest at most {MAX_DEPTH} levels of lists and structs)",
                collapse_repeats(&e.to_string())
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// prost names every level of a too-deep value ("ListValue.values: Value.kind: "
/// a hundred times); a run of one repeated pair of path segments is written once
/// with its count.
fn collapse_repeats(msg: &str) -> String {
    let parts: Vec<&str> = msg.split(": ").collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let mut n = 1;
        while i + 2 * n + 1 < parts.len()
            && parts[i + 2 * n] == parts[i]
            && parts[i + 2 * n + 1] == parts[i + 1]
        {
            n += 1;
        }
        if n > 2 {
            out.push(format!("{}: {} (×{n})", parts[i], parts[i + 1]));
            i += 2 * n;
        } else {
            out.push(parts[i].to_string());
            i += 1;
        }
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_paths_are_written_once() {
        let level = "ListValue.values: Value.kind: ";
        let msg = format!(
            "failed to decode Protobuf message: {}SubmitRequest.args: recursion limit reached",
            level.repeat(49)
        );
        assert_eq!(
            collapse_repeats(&msg),
            "failed to decode Protobuf message: ListValue.values: Value.kind (×49): \
             SubmitRequest.args: recursion limit reached"
        );
        let short = "failed to decode Protobuf message: Value.kind: SubmitRequest.args: bad";
        assert_eq!(collapse_repeats(short), short);
    }
}
