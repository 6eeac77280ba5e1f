// axis_skid: a two-entry AXI-Stream register slice (skid buffer). Breaks the combinational ready path:
// s_ready is a register, and full throughput is kept with back-to-back transfers.

`default_nettype none

module axis_skid #(
    parameter int W = 8   // data bits
) (
    input  wire logic         clk,
    input  wire logic         rst_n,
    input  wire logic         s_valid,
    output      logic         s_ready,
    input  wire logic [W-1:0] s_data,
    input  wire logic         s_last,
    output      logic         m_valid,
    input  wire logic         m_ready,
    output      logic [W-1:0] m_data,
    output      logic         m_last
);
    initial if (W < 1) $fatal(1, "axis_skid: W must be >= 1");

    logic [W-1:0] skid_data;
    logic         skid_last, skid_valid;

    // s_ready is high while the skid register is empty; a beat that arrives while the output is held
    // goes to the skid register and is sent next.
    assign s_ready = !skid_valid;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            m_valid <= 1'b0; m_data <= '0; m_last <= 1'b0;
            skid_valid <= 1'b0; skid_data <= '0; skid_last <= 1'b0;
        end else begin
            if (m_ready || !m_valid) begin
                if (skid_valid) begin
                    m_valid <= 1'b1; m_data <= skid_data; m_last <= skid_last;
                    skid_valid <= 1'b0;
                end else begin
                    m_valid <= s_valid; m_data <= s_data; m_last <= s_last;
                end
            end else if (s_valid && s_ready) begin
                skid_valid <= 1'b1; skid_data <= s_data; skid_last <= s_last;
            end
        end
endmodule

`default_nettype wire
