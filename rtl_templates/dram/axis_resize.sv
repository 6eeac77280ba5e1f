// axis_resize: a byte gearbox from IN_BYTES-wide input words to OUT_BYTES-wide output words, any ratio.
//
// Input bytes are appended in order (byte 0 first, the AXI-Stream byte order); an input word may carry
// fewer bytes, marked by a tkeep of contiguous low bytes (the last word of a padded section). A whole
// output word leaves as soon as OUT_BYTES bytes are held. The buffer holds two input and two output
// words, so a fast side never waits for the slow one: throughput is the slower side's byte rate.
// s_ready and m_valid are functions of the registered byte count only.

`default_nettype none

module axis_resize #(
    parameter int IN_BYTES  = 64,
    parameter int OUT_BYTES = 48
) (
    input  wire logic                   clk,
    input  wire logic                   rst_n,
    input  wire logic                   s_valid,
    output      logic                   s_ready,
    input  wire logic [IN_BYTES*8-1:0]  s_data,
    input  wire logic [IN_BYTES-1:0]    s_keep,
    output      logic                   m_valid,
    input  wire logic                   m_ready,
    output      logic [OUT_BYTES*8-1:0] m_data
);
    localparam int CAP = 2 * (IN_BYTES + OUT_BYTES);   // bytes held
    localparam int CW  = $clog2(CAP + 1);

    initial begin
        if (IN_BYTES < 1 || OUT_BYTES < 1) $fatal(1, "axis_resize: widths must be >= 1 byte");
    end

    logic [CAP*8-1:0] buffer;              // byte i of the stream still held is buffer[i*8 +: 8]
    logic [CW-1:0]    count;

    assign m_valid = count >= CW'(OUT_BYTES);
    assign s_ready = count <= CW'(CAP - IN_BYTES);
    assign m_data  = buffer[OUT_BYTES*8-1:0];

    wire logic take = s_valid && s_ready;
    wire logic give = m_valid && m_ready;
    wire logic [CW-1:0] kept = CW'($countones(s_keep));
    wire logic [CW-1:0] left = count - (give ? CW'(OUT_BYTES) : '0);   // bytes held after this output
    wire logic [CAP*8-1:0] shifted = give ? buffer >> (OUT_BYTES * 8) : buffer;
    // only the kept bytes of the input word enter, placed right after the bytes held
    logic [CAP*8-1:0] incoming;
    always_comb begin
        incoming = '0;
        for (int b = 0; b < IN_BYTES; b++)
            if (s_keep[b]) incoming[b*8 +: 8] = s_data[b*8 +: 8];
    end

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            buffer <= '0; count <= '0;
        end else begin
            buffer <= take ? (shifted | (incoming << ({3'b0, left} << 3))) : shifted;
            count  <= left + (take ? kept : '0);
        end
endmodule

`default_nettype wire
